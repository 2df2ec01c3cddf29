import Foundation
import XCTest
import TTRV

/// Replays every input that `make fuzz` ever found (Tests/Fixtures/fuzz/<target>/) through the
/// same entry point the fuzzer calls. Each must now parse or fail with an error naming the input;
/// a crash fails the whole test run, which is the point.
final class FuzzRegressionTests: XCTestCase {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/fuzz")

    func testEveryStoredFuzzInputIsHandled() throws {
        var replayed = 0
        let folders = try FileManager.default.contentsOfDirectory(atPath: Self.root.path).filter { !$0.contains(".") }
        XCTAssertTrue(Set(folders).isSubset(of: FuzzEntry.targets), "unknown target folders in \(folders)")
        for target in FuzzEntry.targets {
            let dir = Self.root.appendingPathComponent(target)
            let names = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
            for name in names.sorted() where !name.hasPrefix(".") {
                let url = dir.appendingPathComponent(name)
                let outcome = FuzzEntry.run(target, try Data(contentsOf: url), url: url)
                if let outcome {
                    XCTAssertTrue(outcome.contains(url.path), "\(target)/\(name): error does not name the file: \(outcome)")
                }
                replayed += 1
            }
        }
        XCTAssertTrue(FileManager.default.fileExists(atPath: Self.root.path), "no \(Self.root.path)")
        print("replayed \(replayed) stored fuzz inputs")
    }
}
