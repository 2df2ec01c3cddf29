import Foundation
import XCTest
@testable import Models

/// The checkpoints of scripts/reference/hostile_fixtures.py: each must be refused with an error
/// naming the file and what was refused, and none may run its payload (which would create
/// `marker`) or allocate what its headers claim.
final class HostileCheckpointTests: XCTestCase {
    static let dir = fixturesRoot.appendingPathComponent("hostile")
    static let marker = "/tmp/ttrv-hostile-payload-ran"

    private func expectations() throws -> [String: [String]] {
        let data = try Data(contentsOf: Self.dir.appendingPathComponent("expected.json"))
        return try JSONDecoder().decode([String: [String]].self, from: data)
    }

    func testEveryHostileCheckpointIsRefusedNamingFileAndReason() throws {
        try? FileManager.default.removeItem(atPath: Self.marker)
        let cases = try expectations()
        XCTAssertGreaterThanOrEqual(cases.count, 30)
        for (name, words) in cases.sorted(by: { $0.key < $1.key }) {
            let url = Self.dir.appendingPathComponent(name)
            do {
                let tensors = try TorchCheckpoint.load(url)
                XCTAssertTrue(words.isEmpty, "\(name) loaded but should fail with \(words)")
                // The memo bomb sits beside an ordinary tensor, which must come through intact.
                XCTAssertEqual(try tensors["w"]?.floats(), [1, 2, 3, 4], name)
            } catch {
                let message = "\(error)"
                XCTAssertFalse(words.isEmpty, "\(name) failed unexpectedly: \(message)")
                XCTAssertFalse(message.contains("\n"), "\(name): error is not one line: \(message)")
                for word in words + [url.path] {
                    XCTAssertTrue(message.contains(word), "\(name): '\(word)' missing from: \(message)")
                }
            }
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: Self.marker), "a hostile payload ran")
    }

    /// Decoding would allocate width × height before reading a pixel; the header alone refuses them.
    func testImageBombsAreRefusedFromTheHeader() throws {
        let dir = Self.dir.appendingPathComponent("images")
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        XCTAssertEqual(names, ["jpeg_bomb.jpg", "png_bomb.png", "png_too_wide.png"])
        for name in names {
            let url = dir.appendingPathComponent(name)
            XCTAssertThrowsError(try Image.load(url)) { error in
                let message = "\(error)"
                XCTAssertTrue(message.contains(url.path), message)
                XCTAssertTrue(message.contains("too large") || message.contains("IHDR"), message)
            }
        }
    }

    /// A million-deep tuple or list used to overflow the stack when it was freed.
    func testMillionDeepPicklesAreRefusedNotFreedRecursively() {
        let url = URL(fileURLWithPath: "/tmp/deep.pkl")
        let n = 1_000_000
        let deepTuple = Data([0x80, 0x02, 0x29] + [UInt8](repeating: 0x85, count: n) + [0x2e])
        let deepList = Data([0x80, 0x02] + [UInt8](repeating: 0x5d, count: n) + [UInt8](repeating: 0x61, count: n - 1) + [0x2e])
        for data in [deepTuple, deepList] {
            XCTAssertThrowsError(try TorchCheckpoint.checkPickle(data: data, url: url)) { error in
                XCTAssertTrue("\(error)".contains("nests deeper than \(pickleMaxDepth) levels"), "\(error)")
                XCTAssertTrue("\(error)".contains(url.path))
            }
        }
    }

    /// The loads run in a child (the plain `ttrv-fuzz` replay tool) whose heap is capped with
    /// RLIMIT_DATA: libtorch's start-up needs about 70 MB, so 192 MB leaves no room for any of the
    /// terabytes the fixtures' sizes claim (a refused allocation traps in Swift, failing the test),
    /// and which reports the growth of its peak resident memory per file.
    func testHostileLoadsStayWithinAMemoryLimit() throws {
        let tool = try replayTool()
        let files = try expectations().keys.sorted().map { Self.dir.appendingPathComponent($0).path }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/prlimit")
        process.arguments = ["--data=\(192 << 20)", "--", tool.path, "--rss", "torch-checkpoint"] + files
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        XCTAssertEqual(process.terminationStatus, 0, output)
        let lines = output.split(separator: "\n")
        XCTAssertEqual(lines.count, files.count, output)
        for line in lines {
            XCTAssertTrue(line.contains(": ok (peak") || line.contains(": error: torch checkpoint "), String(line))
            // Peak resident growth while loading this one file, which is a few kB to a few MB.
            let growth = line.split(separator: "+").last.flatMap { Int($0.prefix { $0.isNumber }) }
            XCTAssertLessThan(try XCTUnwrap(growth, String(line)), 32 << 10, String(line))
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: Self.marker), "a hostile payload ran")
    }

    private func replayTool() throws -> URL {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for candidate in [dir, dir.deletingLastPathComponent()] {
            let tool = candidate.appendingPathComponent("ttrv-fuzz")
            if FileManager.default.isExecutableFile(atPath: tool.path) { return tool }
        }
        struct Missing: Error, CustomStringConvertible { let description: String }
        throw Missing(description: "ttrv-fuzz is not built next to the test bundle in \(dir.path) (swift build builds it)")
    }
}
