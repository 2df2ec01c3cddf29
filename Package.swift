// swift-tools-version:6.0
import Foundation
import PackageDescription

// libtorch comes from .deps/libtorch (scripts/setup.sh). Absolute paths so that the
// flags work whatever directory SwiftPM runs the compiler and linker from.
let root = Context.packageDirectory
let libtorch = "\(root)/.deps/libtorch"
// A CUDA libtorch (LIBTORCH=... make setup) also gets the NCCL process group when the CUDA and NCCL
// headers are found (CUDA_HOME, NCCL_HOME; default /usr/local/cuda). Otherwise that path is left out.
let env = Context.environment
let cudaInclude = "\(env["CUDA_HOME"] ?? "/usr/local/cuda")/include"
let ncclInclude = env["NCCL_HOME"].map { "\($0)/include" } ?? cudaInclude
let nccl = ["\(libtorch)/lib/libtorch_cuda.so", "\(cudaInclude)/cuda_runtime_api.h", "\(ncclInclude)/nccl.h"]
    .allSatisfy { FileManager.default.fileExists(atPath: $0) }
    ? ["-DTTRV_WITH_NCCL", "-I\(cudaInclude)", "-I\(ncclInclude)"] : []

let package = Package(
    name: "ttrv",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "ttrv", targets: ["ttrv"]),
        .library(name: "Torch", targets: ["Torch"]),
        .library(name: "Models", targets: ["Models"]),
        .library(name: "TTRV", targets: ["TTRV"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .target(
            name: "CTorch",
            cxxSettings: [
                .unsafeFlags([
                    "-I\(libtorch)/include", "-I\(libtorch)/include/torch/csrc/api/include",
                    "-std=c++17", "-O2", "-D_GLIBCXX_USE_CXX11_ABI=1", "-w",
                    "-I\(root)/Sources/CTorch/gloo-stubs",
                ] + nccl),
            ],
            linkerSettings: [
                .linkedLibrary("m"),
                .unsafeFlags([
                    "-L\(libtorch)/lib", "-ltorch_cpu", "-lc10",
                ] + (nccl.isEmpty ? [] : ["-ltorch_cuda"]) + [
                    "-Xlinker", "-rpath", "-Xlinker", "\(libtorch)/lib",
                ]),
            ]
        ),
        .target(name: "Torch", dependencies: ["CTorch"]),
        .systemLibrary(name: "CPNG", path: "Sources/CPNG"),
        .systemLibrary(name: "CJPEG", path: "Sources/CJPEG"),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        .target(name: "Models", dependencies: ["Torch", "CPNG", "CJPEG", "CZlib"]),
        .target(name: "TTRV", dependencies: ["Models", "Torch"]),
        // libFuzzer driver (make fuzz) and, built plainly, a replay tool for the parsers.
        .executableTarget(name: "ttrv-fuzz", dependencies: ["TTRV"]),
        .executableTarget(
            name: "ttrv",
            dependencies: ["TTRV", "Models", "Torch", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(name: "TorchTests", dependencies: ["Torch"], exclude: []),
        .testTarget(name: "ModelsTests", dependencies: ["Models", "Torch"]),
        .testTarget(name: "TTRVTests", dependencies: ["TTRV", "Models", "Torch"]),
    ],
    cxxLanguageStandard: .cxx17
)
