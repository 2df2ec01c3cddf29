import Foundation
import Models
import Torch

/// One entry point per file parser, fed raw bytes: what the libFuzzer driver (`ttrv-fuzz`,
/// `make fuzz`) and the regression replay in the tests call. A parser may throw on bad bytes —
/// that is the point — but must never trap, hang or allocate far beyond the input's size.
public enum FuzzEntry {
    /// Target names; each is also the folder of its corpus and crash inputs.
    public static let targets = [
        "gguf", "safetensors", "torch-checkpoint", "pickle", "tokenizer", "config-llama",
        "config-qwen25vl", "config-internvl", "config-composed", "png", "jpeg", "idx", "dataset",
        "chat-template",
    ]

    /// Tensors larger than this are not materialised: their bounds are what is under test.
    static let maxElements = 1 << 16

    /// Parses `data` with `target`'s parser. Returns nil when it was accepted, else the error text.
    /// `url` names the input in errors (a placeholder when fuzzing).
    @discardableResult
    public static func run(_ target: String, _ data: Data, url: URL? = nil) -> String? {
        do {
            try parse(target, data, url ?? URL(fileURLWithPath: "/nonexistent/fuzz/\(target).input"))
            return nil
        } catch {
            return "\(error)"
        }
    }

    static func parse(_ target: String, _ data: Data, _ url: URL) throws {
        switch target {
        case "gguf": try gguf(data, url)
        case "safetensors": try safetensors(data, url)
        case "torch-checkpoint": try torchCheckpoint(data, url)
        case "pickle": _ = try TorchCheckpoint.checkPickle(data: data, url: url)
        case "tokenizer":
            let tokenizer = try Tokenizer(tokenizerJSON: data, url: url)
            _ = tokenizer.decode(tokenizer.encode("Hello, wörld 123 <|im_end|>"))
        case "config-llama": _ = try LlamaConfig.decode(data, url: url)
        case "config-qwen25vl":
            _ = try Qwen25VLConfig.decode(data, url: url)
            do { _ = try Qwen25VLImageProcessor(json: data) } catch { throw ModelError("\(url.path): \(error)") }
        case "config-internvl": _ = try InternVLConfig(data: data, url: url)
        case "config-composed": _ = try ComposedConfig.decode(data, url: url)
        case "png", "jpeg": _ = try Image.decode(data, name: url.path)
        case "idx": _ = try IDXFile.read(data: data, path: url.path)
        case "dataset": _ = try DatasetFile.load(data: data, url: url)
        case "chat-template": try chatTemplate(data, url)
        default: preconditionFailure("unknown fuzz target \(target)")
        }
    }

    private static func gguf(_ data: Data, _ url: URL) throws {
        let file = try GGUFFile(data: data, url: url)
        for info in file.tensors where info.elementCount <= maxElements {
            _ = try? file.dequantize(info)  // unsupported types throw; the others must stay in bounds
        }
        let config = try LlamaConfig(gguf: file)
        try config.validate()
        _ = try LMLoader.tokenizerFromGGUF(file)
    }

    /// A template from a stranger's checkpoint, rendered with a conversation like the ones ttrv sends.
    private static func chatTemplate(_ data: Data, _ url: URL) throws {
        let template = try ChatTemplate(jinja: String(decoding: data, as: UTF8.self), file: url.path,
                                        specialTokens: ["bos_token": .string("<s>"), "eos_token": .string("</s>")])
        let conversation: [ChatMessage] = [
            .system("Answer with one letter."), .user(parts: "<image>\nWhat is this? A. shirt B. shoe", images: 1),
            .assistant("B"), .user("And this?"),
        ]
        _ = try template.render(conversation, addGenerationPrompt: true)
    }

    private static func safetensors(_ data: Data, _ url: URL) throws {
        let file = try SafeTensorsFile(data: data, url: url)
        for name in file.names {
            _ = try file.withBytes(name) { raw in raw.reduce(0) { $0 &+ Int($1) } }
        }
    }

    private static func torchCheckpoint(_ data: Data, _ url: URL) throws {
        for (_, tensor) in try TorchCheckpoint.load(data: data, url: url) where tensor.count <= maxElements {
            _ = tensor.contiguousBytes()
            if tensor.dtype.isFloatingPoint { _ = try tensor.floats() }
        }
    }
}
