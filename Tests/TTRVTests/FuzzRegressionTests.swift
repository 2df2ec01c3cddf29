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

    /// The same inputs in a child (the plain `ttrv-fuzz` replay tool) that reports how much its peak
    /// resident memory grew per input: none may take more than 64 MB (the PNG whose zTXt chunk
    /// claimed 1.9 GB took 1.9 GB). The heap cap only protects the machine; set below 2 GB, it made
    /// that malloc fail quietly and hid the bug.
    func testStoredInputsStayWithinAMemoryLimit() throws {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        let tool = try XCTUnwrap([dir, dir.deletingLastPathComponent()].map { $0.appendingPathComponent("ttrv-fuzz") }
            .first { FileManager.default.isExecutableFile(atPath: $0.path) }, "ttrv-fuzz is not built next to \(dir.path)")
        for target in FuzzEntry.targets {
            let folder = Self.root.appendingPathComponent(target)
            let files = ((try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? [])
                .filter { !$0.hasPrefix(".") }.sorted().map { folder.appendingPathComponent($0).path }
            guard !files.isEmpty else { continue }
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/prlimit")
            process.arguments = ["--data=\(4 << 30)", "--", tool.path, "--rss", target] + files
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = pipe
            try process.run()
            let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            XCTAssertEqual(process.terminationStatus, 0, "\(target): \(output)")
            let lines = output.split(separator: "\n")
            XCTAssertEqual(lines.count, files.count, output)
            for line in lines {
                XCTAssertTrue(line.contains(": ok (peak") || line.contains(": error: "), "\(target): \(line)")
                let growth = line.split(separator: "+").last.flatMap { Int($0.prefix { $0.isNumber }) }
                XCTAssertLessThan(try XCTUnwrap(growth, String(line)), 64 << 10, "\(target): \(line)")
            }
        }
    }
}
