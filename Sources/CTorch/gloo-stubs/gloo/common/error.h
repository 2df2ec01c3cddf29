// Stub: ProcessGroupGloo.hpp includes this but uses nothing from it (see README.md).
#pragma once
