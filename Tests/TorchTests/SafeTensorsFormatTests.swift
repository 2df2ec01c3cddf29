import Foundation
import XCTest
@testable import Torch

final class SafeTensorsFormatTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/ckpt")

    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("st-tests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: dir)
    }

    private func assertThrows(_ expression: @autoclosure () throws -> some Any, mentioning words: [String],
                              file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try expression(), file: file, line: line) { error in
            let message = "\(error)"
            for word in words {
                XCTAssertTrue(message.contains(word), "'\(word)' missing from: \(message)", file: file, line: line)
            }
        }
    }

    /// A file with a hand-written header, for exercising the validation paths.
    private func craft(_ header: String, data: [UInt8] = [], name: String = "crafted.safetensors") throws -> URL {
        var bytes = withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { Array($0) }
        bytes += Array(header.utf8) + data
        let url = dir.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url
    }

    private func bytes(_ file: SafeTensorsFile, _ name: String) throws -> [UInt8] {
        try file.withBytes(name) { Array($0) }
    }

    // MARK: round trip

    func testRoundTripEveryDTypeIsByteExact() throws {
        var rng = SystemRandomNumberGenerator()
        let shapes: [STDType: [Int]] = [.F32: [3, 4], .F16: [5], .BF16: [2, 3], .I64: [2, 2], .I32: [3],
                                        .U8: [7], .BOOL: [4], .F64: [2], .I16: [3], .I8: [1, 1, 3]]
        var tensors: [(name: String, dtype: STDType, shape: [Int], bytes: Data)] = []
        for dtype in STDType.allCases {
            let shape = shapes[dtype]!
            let count = shape.reduce(1, *) * dtype.byteSize
            let raw = (0..<count).map { _ in dtype == .BOOL ? UInt8.random(in: 0...1, using: &rng) : UInt8.random(in: 0...255, using: &rng) }
            tensors.append(("t_\(dtype.rawValue.lowercased())", dtype, shape, Data(raw)))
        }
        tensors.append(("scalar", .F32, [], Data([0, 0, 0xc0, 0x3f])))
        tensors.append(("empty", .F32, [0, 3], Data()))
        let url = dir.appendingPathComponent("round.safetensors")
        let metadata = ["format": "pt", "quote\"and\\slash": "line\nbreak é"]
        try SafeTensorsWriter.write(tensors, metadata: metadata, to: url)

        let file = try SafeTensorsFile(url: url)
        XCTAssertEqual(file.names, tensors.map(\.name).sorted())
        XCTAssertEqual(file.metadata, metadata)
        let headerLength = try Data(contentsOf: url).prefix(8).withUnsafeBytes { Int(UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self))) }
        XCTAssertEqual((8 + headerLength) % 8, 0, "data section must start 8-aligned")
        for t in tensors {
            let entry = try XCTUnwrap(file.entries[t.name])
            XCTAssertEqual(entry.dtype, t.dtype, t.name)
            XCTAssertEqual(entry.shape, t.shape, t.name)
            XCTAssertEqual(entry.range.lowerBound % t.dtype.byteSize, 0, "\(t.name) misaligned")
            XCTAssertEqual(try bytes(file, t.name), Array(t.bytes), t.name)
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["round.safetensors"],
                       "the temp file must be renamed away")
    }

    func testWriteReplacesExistingFileAndKeepsHeaderKeysSorted() throws {
        let url = dir.appendingPathComponent("replace.safetensors")
        try Data("old contents".utf8).write(to: url)
        try SafeTensorsWriter.write([("zeta", .U8, [1], Data([9])), ("alpha", .I32, [1], Data([1, 0, 0, 0]))],
                                    metadata: nil, to: url)
        let data = try Data(contentsOf: url)
        let header = String(decoding: data[8..<data.count - 5], as: UTF8.self)
        let alpha = try XCTUnwrap(header.range(of: "\"alpha\"")), zeta = try XCTUnwrap(header.range(of: "\"zeta\""))
        XCTAssertLessThan(alpha.lowerBound, zeta.lowerBound)
        XCTAssertFalse(header.contains("__metadata__"))
        XCTAssertEqual(try bytes(SafeTensorsFile(url: url), "zeta"), [9])
    }

    func testWriterRejectsBadInputWithoutTouchingDestination() throws {
        let url = dir.appendingPathComponent("bad.safetensors")
        try Data("keep".utf8).write(to: url)
        assertThrows(try SafeTensorsWriter.write([("x", .F32, [2], Data([1, 2, 3]))], metadata: nil, to: url),
                     mentioning: ["bad.safetensors", "'x'", "3 bytes", "needs 8"])
        assertThrows(try SafeTensorsWriter.write([("x", .U8, [1], Data([1])), ("x", .U8, [1], Data([1]))], metadata: nil, to: url),
                     mentioning: ["twice"])
        XCTAssertEqual(try Data(contentsOf: url), Data("keep".utf8))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), ["bad.safetensors"])
    }

    // MARK: files written by Python

    func testReadsPythonWrittenFileExactly() throws {
        let file = try SafeTensorsFile(url: Self.fixtures.appendingPathComponent("st_python.safetensors"))
        let expected = try JSONSerialization.jsonObject(
            with: Data(contentsOf: Self.fixtures.appendingPathComponent("st_python.json"))) as! [String: Any]
        XCTAssertEqual(file.metadata, expected["metadata"] as? [String: String])
        let tensors = expected["tensors"] as! [String: [String: Any]]
        XCTAssertEqual(file.names, tensors.keys.sorted())
        for (name, info) in tensors {
            let entry = try XCTUnwrap(file.entries[name])
            XCTAssertEqual(entry.dtype.rawValue, info["dtype"] as? String, name)
            XCTAssertEqual(entry.shape, info["shape"] as? [Int], name)
            XCTAssertEqual(try bytes(file, name), hexBytes(info["hex"] as! String), name)
        }
        // Decoded values too, so a consistent-but-wrong byte order could not pass.
        let f32 = try file.withBytes("a_f32") { $0.loadUnaligned(as: Float.self) }
        let i64 = try file.withBytes("d_i64") { $0.loadUnaligned(as: Int64.self) }
        XCTAssertEqual(i64, -(1 << 40))
        XCTAssertTrue(f32.isFinite && f32 != 0)
    }

    private func hexBytes(_ hex: String) -> [UInt8] {
        let chars = Array(hex.utf8)
        return stride(from: 0, to: chars.count, by: 2).map { UInt8(String(decoding: chars[$0..<$0 + 2], as: UTF8.self), radix: 16)! }
    }

    // MARK: malformed files

    func testTruncatedInDataSection() throws {
        let data = try Data(contentsOf: Self.fixtures.appendingPathComponent("st_python.safetensors"))
        let url = dir.appendingPathComponent("cut-data.safetensors")
        try data.prefix(data.count - 5).write(to: url)
        assertThrows(try SafeTensorsFile(url: url), mentioning: ["cut-data.safetensors", "truncated"])
    }

    func testTruncatedInHeader() throws {
        let data = try Data(contentsOf: Self.fixtures.appendingPathComponent("st_python.safetensors"))
        let url = dir.appendingPathComponent("cut-header.safetensors")
        try data.prefix(40).write(to: url)
        assertThrows(try SafeTensorsFile(url: url), mentioning: ["cut-header.safetensors", "truncated", "header"])
        try data.prefix(5).write(to: url)
        assertThrows(try SafeTensorsFile(url: url), mentioning: ["truncated"])
    }

    func testInvalidJSONHeader() throws {
        let url = try craft("{\"a\": {\"dtype\": \"F32\",", data: [])
        assertThrows(try SafeTensorsFile(url: url), mentioning: ["crafted.safetensors", "JSON"])
    }

    func testImplausibleHeaderLength() throws {
        let url = dir.appendingPathComponent("huge.safetensors")
        try Data([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0] + Array("{}".utf8)).write(to: url)
        assertThrows(try SafeTensorsFile(url: url), mentioning: ["huge.safetensors", "header length"])
    }

    /// Offsets near 2^63 used to overflow when added to the data section's start.
    func testOffsetsNearIntMaxAreRefused() throws {
        let end = 9_223_372_036_854_775_800  // 8 × 1152921504606846975
        let url = try craft(#"{"w":{"dtype":"F64","shape":[1152921504606846975],"data_offsets":[0,\#(end)]}}"#, data: [0])
        assertThrows(try SafeTensorsFile(url: url), mentioning: ["crafted.safetensors", "'w'", "data_offsets", "\(end)"])
    }

    func testOffsetsOutOfRange() throws {
        let gap = try craft(#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}"#, data: Array(repeating: 0, count: 16))
        assertThrows(try SafeTensorsFile(url: gap), mentioning: ["'w'", "data_offsets"])
        let reversed = try craft(#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, data: Array(repeating: 0, count: 8))
        assertThrows(try SafeTensorsFile(url: reversed), mentioning: ["'w'", "data_offsets"])
        let overlap = try craft(#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                                data: Array(repeating: 0, count: 6))
        assertThrows(try SafeTensorsFile(url: overlap), mentioning: ["'b'", "overlaps"])
    }

    func testWrongByteCount() throws {
        let url = try craft(#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,8]}}"#, data: Array(repeating: 0, count: 8))
        assertThrows(try SafeTensorsFile(url: url), mentioning: ["crafted.safetensors", "'w'", "needs 16"])
    }

    func testUnknownDTypeAndMissingTensor() throws {
        let url = try craft(#"{"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}}"#, data: [0])
        assertThrows(try SafeTensorsFile(url: url), mentioning: ["'w'", "F8_E4M3"])
        let ok = try craft(#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}  "#, data: [7], name: "ok.safetensors")
        let file = try SafeTensorsFile(url: ok)
        XCTAssertEqual(try bytes(file, "w"), [7])
        assertThrows(try file.withBytes("nope") { _ in }, mentioning: ["ok.safetensors", "nope"])
    }
}

final class SafeTensorsTensorTests: XCTestCase {
    func testTensorRoundTripEveryDtype() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("st-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let base = try Tensor([Float(1.5), -2.25, 3, 0, 7, -8], shape: [2, 3])
        var tensors: [String: Tensor] = [:]
        for dt in [DType.float32, .float16, .bfloat16, .int64, .int32, .uint8, .bool, .float64] {
            tensors["t.\(dt)"] = try base.abs().to(dt)
        }
        tensors["strided"] = try base.transpose(0, 1) // non-contiguous input is written row-major
        let url = dir.appendingPathComponent("m.safetensors")
        try saveSafeTensors(tensors, metadata: ["format": "pt"], to: url)
        let file = try SafeTensorsFile(url: url)
        XCTAssertEqual(file.metadata["format"], "pt")
        for (name, t) in tensors {
            let back = try file.tensor(name)
            XCTAssertEqual(back.dtype, t.dtype, name)
            XCTAssertEqual(back.shape, t.shape, name)
            XCTAssertEqual(try back.to(.float64).doubles(), try t.to(.float64).doubles(), name)
        }
        XCTAssertEqual(try file.tensor("strided").floats(), [1.5, 0, -2.25, 7, 3, -8])
        XCTAssertThrowsError(try file.tensor("nope")) { XCTAssertTrue("\($0)".contains("m.safetensors")) }
    }
}
