import Foundation
import Models
import Torch
import XCTest
@testable import TTRV

#if canImport(Glibc)
import Glibc
#endif

/// Broken inputs of every kind a user can hand ttrv: each must fail with one line naming the
/// file and the problem, and never crash or leave a half-written output behind.
final class BadInputTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures")
    private var scratch: URL!

    override func setUpWithError() throws {
        scratch = FileManager.default.temporaryDirectory.appendingPathComponent("ttrv-bad-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: scratch)
    }

    private func fixture(_ path: String) -> URL { Self.fixtures.appendingPathComponent(path) }

    private func assertOneLineError(_ body: () throws -> Any, naming words: [String],
                                    file: StaticString = #filePath, line: UInt = #line) {
        do {
            _ = try body()
            XCTFail("accepted; expected an error mentioning \(words)", file: file, line: line)
        } catch {
            let message = "\(error)"
            XCTAssertFalse(message.contains("\n"), "not one line: \(message)", file: file, line: line)
            for word in words {
                XCTAssertTrue(message.contains(word), "'\(word)' missing from: \(message)", file: file, line: line)
            }
        }
    }

    // MARK: truncation

    /// Cuts `source` at 10 evenly spaced points and loads each prefix as `name`; every one must
    /// fail naming the file (or, where a prefix can be a whole valid file, `prefixMayLoad` says so).
    private func assertTruncationsFail(_ source: URL, as name: String, prefixMayLoad: (Data) -> Bool = { _ in false },
                                       file: StaticString = #filePath, line: UInt = #line,
                                       _ load: (URL) throws -> Any) throws {
        let data = try Data(contentsOf: source)
        let dir = scratch.appendingPathComponent("cut-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let url = dir.appendingPathComponent(name)
        for k in 1...10 {
            let prefix = data.prefix(data.count * k / 11)
            try prefix.write(to: url)
            if prefixMayLoad(prefix), (try? load(url)) != nil { continue }
            assertOneLineError({ try load(url) }, naming: [url.path], file: file, line: line)
        }
    }

    func testTruncatedModelFilesAtTenCutPoints() throws {
        try assertTruncationsFail(fixture("gguf/fixture.gguf"), as: "m.gguf") { try GGUFFile(url: $0) }
        try assertTruncationsFail(fixture("ckpt/st_python.safetensors"), as: "m.safetensors") { try SafeTensorsFile(url: $0) }
        try assertTruncationsFail(fixture("ckpt/torch_zip.pt"), as: "zip.pt") { try TorchCheckpoint.load($0) }
        try assertTruncationsFail(fixture("ckpt/torch_legacy.pt"), as: "legacy.pt") { try TorchCheckpoint.load($0) }
        try assertTruncationsFail(fixture("tokenizer/qwen2/tokenizer.json"), as: "tokenizer.json") {
            try Tokenizer(tokenizerJSON: $0)
        }
    }

    func testTruncatedConfigsAtTenCutPoints() throws {
        try assertTruncationsFail(fixture("lm/tiny-llama/config.json"), as: "config.json") {
            try LMLoader.loadHFModel($0.deletingLastPathComponent())
        }
        try assertTruncationsFail(fixture("qwen25vl/config.json"), as: "config.json") {
            try Qwen25VLConfig.decode(Data(contentsOf: $0), url: $0)
        }
        try assertTruncationsFail(fixture("internvl/tiny/config.json"), as: "config.json") { try InternVLConfig(contentsOf: $0) }
        try assertTruncationsFail(fixture("../../models/default-vlm/config.json"), as: "config.json") {
            try ComposedConfig.decode(Data(contentsOf: $0), url: $0)
        }
    }

    func testTruncatedImagesAndDataAtTenCutPoints() throws {
        try assertTruncationsFail(fixture("images/rgb.png"), as: "i.png") { try Image.load($0) }
        try assertTruncationsFail(fixture("images/photo.jpg"), as: "i.jpg") { try Image.load($0) }
        let idx = scratch.appendingPathComponent("src.idx")
        try Data([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 3] + (0..<18).map { UInt8($0) }).write(to: idx)
        try assertTruncationsFail(idx, as: "t.idx") { try IDXFile.read($0) }
        let gzip = Process()
        gzip.executableURL = URL(fileURLWithPath: "/bin/gzip")
        gzip.arguments = ["-k", "-n", idx.path]
        try gzip.run()
        gzip.waitUntilExit()
        try assertTruncationsFail(scratch.appendingPathComponent("src.idx.gz"), as: "t.idx.gz") { try IDXFile.read($0) }
        try assertTruncationsFail(fixture("ttrv/rows.json"), as: "rows.json") { try DatasetFile.load($0) }
        // A JSONL prefix that ends on a line boundary is a shorter valid file.
        try assertTruncationsFail(fixture("ttrv/rows.jsonl"), as: "rows.jsonl", prefixMayLoad: { $0.last == 0x0a }) {
            try DatasetFile.load($0)
        }
    }

    // MARK: weights against the config

    /// tiny-llama's config and weights, with `edit` applied to the tensor list before writing.
    private func llamaDir(_ edit: (inout [(name: String, dtype: STDType, shape: [Int], bytes: Data)]) -> Void) throws -> URL {
        let dir = scratch.appendingPathComponent("llama-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try FileManager.default.copyItem(at: fixture("lm/tiny-llama/config.json"), to: dir.appendingPathComponent("config.json"))
        let source = try SafeTensorsFile(url: fixture("lm/tiny-llama/model.safetensors"))
        var tensors = try source.names.map { name in
            let e = source.entries[name]!
            return (name: name, dtype: e.dtype, shape: e.shape, bytes: try source.withBytes(name) { Data($0) })
        }
        edit(&tensors)
        try SafeTensorsWriter.write(tensors, metadata: nil, to: dir.appendingPathComponent("model.safetensors"))
        return dir
    }

    func testUnchangedTinyLlamaLoads() throws {
        XCTAssertNoThrow(try LMLoader.loadHFModel(try llamaDir { _ in }))
    }

    func testWrongShapeAndDtypeAgainstTheConfig() throws {
        let shape = try llamaDir { t in
            let i = t.firstIndex { $0.name == "model.layers.0.mlp.down_proj.weight" }!
            t[i].shape = [128, 64]
        }
        assertOneLineError({ try LMLoader.loadHFModel(shape) },
                           naming: [shape.path, "model.layers.0.mlp.down_proj.weight", "[64, 128]"])
        let dtype = try llamaDir { t in
            let i = t.firstIndex { $0.name == "model.norm.weight" }!
            t[i].dtype = .I32
        }
        assertOneLineError({ try LMLoader.loadHFModel(dtype) }, naming: [dtype.path, "model.norm.weight", "not floating point"])
        let missing = try llamaDir { t in t.removeAll { $0.name == "model.layers.1.mlp.up_proj.weight" } }
        assertOneLineError({ try LMLoader.loadHFModel(missing) }, naming: [missing.path, "model.layers.1.mlp.up_proj.weight"])
    }

    func testAbsurdConfigValuesAreRefusedNamingConfigJSON() throws {
        for (key, value) in [("hidden_size", "-64"), ("num_hidden_layers", "1000000"), ("num_attention_heads", "0"),
                             ("vocab_size", "0"), ("rope_theta", "-1")] {
            let dir = try llamaDir { _ in }
            let configURL = dir.appendingPathComponent("config.json")
            var config = try JSONSerialization.jsonObject(with: Data(contentsOf: configURL)) as! [String: Any]
            config[key] = try JSONSerialization.jsonObject(with: Data(value.utf8), options: .fragmentsAllowed)
            try JSONSerialization.data(withJSONObject: config).write(to: configURL)
            assertOneLineError({ try LMLoader.loadHFModel(dir) }, naming: [configURL.path, key])
        }
        // In range one by one, but together far more parameters than the 560 kB of weights hold.
        let dir = try llamaDir { _ in }
        let configURL = dir.appendingPathComponent("config.json")
        var config = try JSONSerialization.jsonObject(with: Data(contentsOf: configURL)) as! [String: Any]
        config["num_hidden_layers"] = 1000
        config["intermediate_size"] = 100_000
        try JSONSerialization.data(withJSONObject: config).write(to: configURL)
        assertOneLineError({ try LMLoader.loadHFModel(dir) }, naming: [configURL.path, "parameters"])
    }

    /// Each used to divide by zero or overflow before any check ran.
    func testVLMConfigValuesThatWouldTrapAreRefused() throws {
        func edited(_ source: String, _ edit: (inout [String: Any]) -> Void) throws -> URL {
            var json = try JSONSerialization.jsonObject(with: Data(contentsOf: fixture(source))) as! [String: Any]
            edit(&json)
            let url = scratch.appendingPathComponent("c-\(UUID().uuidString)").appendingPathComponent("config.json")
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try JSONSerialization.data(withJSONObject: json).write(to: url)
            return url
        }
        func vision(_ key: String, _ value: Any) -> (inout [String: Any]) -> Void {
            { json in
                var v = json["vision_config"] as! [String: Any]
                v[key] = value
                json["vision_config"] = v
            }
        }
        for (key, value) in [("num_attention_heads", 0 as Any), ("patch_size", 0), ("image_size", -448)] {
            let url = try edited("internvl/tiny/config.json", vision(key, value))
            assertOneLineError({ try InternVLConfig(contentsOf: url) }, naming: [url.path, key])
        }
        let ratio = try edited("internvl/tiny/config.json") { $0["downsample_ratio"] = 0 }
        assertOneLineError({ try InternVLConfig(contentsOf: ratio) }, naming: [ratio.path, "downsample_ratio"])
        for (key, value) in [("num_heads", 0 as Any), ("spatial_merge_size", 0), ("patch_size", 0)] {
            let url = try edited("qwen25vl/config.json", vision(key, value))
            assertOneLineError({ try Qwen25VLConfig.decode(Data(contentsOf: url), url: url) }, naming: [url.path, key])
        }
        let section = try edited("qwen25vl/config.json") { json in
            var rope = json["rope_scaling"] as! [String: Any]
            rope["mrope_section"] = [Int.max, Int.max, 2]
            json["rope_scaling"] = rope
        }
        assertOneLineError({ try Qwen25VLConfig.decode(Data(contentsOf: section), url: section) },
                           naming: [section.path, "mrope_section"])
    }

    func testDeeplyNestedJSONIsRefusedNotRecursedInto() throws {
        let deep = Data((String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)).utf8)
        let dir = scratch.appendingPathComponent("deep")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for name in ["rows.json", "tokenizer.json", "config.json"] {
            try deep.write(to: dir.appendingPathComponent(name))
        }
        let rows = dir.appendingPathComponent("rows.json"), tok = dir.appendingPathComponent("tokenizer.json")
        assertOneLineError({ try DatasetFile.load(rows) }, naming: [rows.path, "nested"])
        assertOneLineError({ try Tokenizer(tokenizerJSON: tok) }, naming: [tok.path, "nested"])
        assertOneLineError({ try LMLoader.loadHFModel(dir) }, naming: [dir.appendingPathComponent("config.json").path])
        assertOneLineError({ try InternVLConfig(contentsOf: dir.appendingPathComponent("config.json")) }, naming: ["nested"])
    }

    func testMissingShardAndHostileIndex() throws {
        let dir = try llamaDir { _ in }
        let index = dir.appendingPathComponent("model.safetensors.index.json")
        try #"{"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}"#.write(
            to: index, atomically: true, encoding: .utf8)
        assertOneLineError({ try LMLoader.loadHFModel(dir) }, naming: [index.path, "model-00002-of-00002.safetensors", "missing"])
        try #"{"weight_map": {"a": "../../etc/passwd"}}"#.write(to: index, atomically: true, encoding: .utf8)
        assertOneLineError({ try LMLoader.loadHFModel(dir) }, naming: [index.path, "../../etc/passwd", "not a file in this folder"])
        try FileManager.default.removeItem(at: index)
        try FileManager.default.removeItem(at: dir.appendingPathComponent("model.safetensors"))
        assertOneLineError({ try LMLoader.loadHFModel(dir) }, naming: [dir.appendingPathComponent("model.safetensors").path, "missing"])
    }

    func testLlamaAttentionBiasAlsoBiasesOProj() throws {
        // transformers' LlamaAttention: q/k/v/o_proj all take bias=config.attention_bias.
        var config = LlamaConfig(vocabSize: 16, hiddenSize: 8, intermediateSize: 16, numHiddenLayers: 1,
                                 numAttentionHeads: 2, numKeyValueHeads: 1)
        config.attentionBias = true
        let names = Set(try LlamaForCausalLM(config).namedParameters().map(\.0))
        for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            XCTAssertTrue(names.contains("model.layers.0.self_attn.\(p).bias"), p)
        }
        config.modelType = "qwen2"  // Qwen2Attention: biased q/k/v, unbiased o_proj
        let qwen = Set(try LlamaForCausalLM(config).namedParameters().map(\.0))
        XCTAssertTrue(qwen.contains("model.layers.0.self_attn.q_proj.bias"))
        XCTAssertFalse(qwen.contains("model.layers.0.self_attn.o_proj.bias"))
    }

    // MARK: datasets

    func testDatasetRowProblemsNameFileAndRow() throws {
        let options = #"<image> Which? \n Options:\nA. cat\nB. dog\nC. fox\nD. owl"#
        let rows = scratch.appendingPathComponent("rows.jsonl")
        try """
        {"prompt": "\(options)", "image_path": "a.png", "answer": "B"}
        {"prompt": "\(options)", "image_path": "a.png", "answer": "Z"}
        """.write(to: rows, atomically: true, encoding: .utf8)
        assertOneLineError({ try DatasetFile.load(rows) }, naming: [rows.path, "line 2", "answer \"Z\""])

        try #"{"prompt": "<image> Which?\nOptions:\n", "image_path": "a.png", "answer": "A"}"#
            .write(to: rows, atomically: true, encoding: .utf8)
        assertOneLineError({ try DatasetFile.load(rows) }, naming: [rows.path, "line 1", "Options:"])

        // Option text is a valid answer too; a missing image is found when it is read.
        try #"{"prompt": "\#(options)", "image_path": "missing.png", "answer": "dog"}"#
            .write(to: rows, atomically: true, encoding: .utf8)
        let item = try XCTUnwrap(try DatasetFile.load(rows).first)
        let image = try XCTUnwrap(item.imagePath)
        assertOneLineError({ try Image.load(image) }, naming: [image.path, "no such file"])
    }

    // MARK: CLI

    func testUnknownCLIValuesFailWithOneLineNamingTheValue() throws {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        let ttrv = [dir, dir.deletingLastPathComponent()].map { $0.appendingPathComponent("ttrv") }
            .first { FileManager.default.isExecutableFile(atPath: $0.path) }
        let binary = try XCTUnwrap(ttrv, "the ttrv executable is not built next to the test bundle")
        let cases: [([String], String)] = [
            (["adapt", "--model", "default", "--data", "fashion-mnist:test", "--mode", "bogus", "--out", scratch.path], "--mode"),
            (["eval", "--model", "default", "--data", "fashion-mnist-c:nosuch:3", "--limit", "1"], "fashion-mnist-c:nosuch:3"),
            (["eval", "--model", scratch.appendingPathComponent("nomodel").path, "--data", "fashion-mnist:test"], "nomodel"),
            (["eval", "--model", "default", "--data", scratch.appendingPathComponent("no.jsonl").path], "no.jsonl"),
        ]
        for (args, word) in cases {
            let process = Process()
            process.executableURL = binary
            process.arguments = args
            let pipe = Pipe()
            process.standardError = pipe
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            XCTAssertNotEqual(process.terminationStatus, 0, "\(args)")
            let first = output.split(separator: "\n").first.map(String.init) ?? ""
            XCTAssertTrue(first.hasPrefix("Error: ") && first.contains(word), "\(args): \(output)")
        }
    }

    // MARK: failed writes

    /// A write that fails halfway (RLIMIT_FSIZE makes write(2) return EFBIG, as a full disk gives
    /// ENOSPC) must leave the previous checkpoint byte for byte and no temp file behind.
    func testFailedCheckpointWriteKeepsThePreviousFile() throws {
        let url = scratch.appendingPathComponent("adapted.safetensors")
        try saveSafeTensors(["w": try Tensor([1, 2, 3, 4] as [Float], shape: [4])], to: url)
        let before = try Data(contentsOf: url)

        let big = try Tensor.zeros([1 << 20])
        var old = rlimit()
        getrlimit(Int32(RLIMIT_FSIZE.rawValue), &old)
        let oldHandler = signal(SIGXFSZ, SIG_IGN)
        var limit = rlimit(rlim_cur: 64 * 1024, rlim_max: old.rlim_max)
        setrlimit(Int32(RLIMIT_FSIZE.rawValue), &limit)
        let result = Result { try saveSafeTensors(["w": big], to: url) }
        setrlimit(Int32(RLIMIT_FSIZE.rawValue), &old)
        signal(SIGXFSZ, oldHandler)

        XCTAssertThrowsError(try result.get()) { error in
            let message = "\(error)"
            XCTAssertTrue(message.contains(url.path) && message.contains("write failed"), message)
            XCTAssertFalse(message.contains("\n"))
        }
        XCTAssertEqual(try Data(contentsOf: url), before, "the earlier checkpoint was damaged")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: scratch.path), ["adapted.safetensors"])
    }
}
