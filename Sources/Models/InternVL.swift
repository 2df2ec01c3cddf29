import Foundation
import Torch

// InternVL (InternVL2.5 / InternVL3 with a Qwen2 decoder) as transformers implements it natively
// (InternVLForConditionalGeneration, model_type "internvl", the `-hf` checkpoints): InternViT encoder,
// pixel-shuffle downsampling, an MLP projector and the Qwen2 decoder of Llama.swift. The original
// remote-code checkpoints (InternVLChatModel) load too, through `InternVLWeights.renames`.

// MARK: - configuration

public struct InternVisionConfig: Decodable, Sendable {
    public var hiddenSize: Int
    public var numHiddenLayers: Int
    public var numAttentionHeads: Int
    public var intermediateSize: Int
    public var imageSize: Int
    public var patchSize: Int
    public var numChannels = 3
    public var attentionBias = true
    public var useQKNorm = false
    /// "layer_norm" or "rms_norm".
    public var normType = "layer_norm"
    public var layerNormEps = 1e-6
    /// true: no final LayerNorm (all converted InternVL checkpoints).
    public var useMeanPooling = true
    public var hiddenAct = "gelu"

    // `-hf` names first, then the remote-code (InternVisionConfig) spelling of the same setting.
    enum CodingKeys: String, CodingKey {
        case hiddenSize = "hidden_size", numHiddenLayers = "num_hidden_layers", numAttentionHeads = "num_attention_heads"
        case intermediateSize = "intermediate_size", imageSize = "image_size", patchSize = "patch_size"
        case numChannels = "num_channels", attentionBias = "attention_bias", qkvBias = "qkv_bias"
        case useQKNorm = "use_qk_norm", qkNormalization = "qk_normalization", normType = "norm_type"
        case layerNormEps = "layer_norm_eps", useMeanPooling = "use_mean_pooling", hiddenAct = "hidden_act"
        case useAbsolutePositionEmbeddings = "use_absolute_position_embeddings"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        // image_size / patch_size are an int in remote-code configs and [h, w] in `-hf` ones.
        func square(_ key: CodingKeys) throws -> Int {
            if let v = try? c.decode(Int.self, forKey: key) { return v }
            let hw = try c.decode([Int].self, forKey: key)
            guard hw.count == 2, hw[0] == hw[1] else { throw ModelError("vision_config.\(key.rawValue) \(hw) is not square") }
            return hw[0]
        }
        hiddenSize = try c.decode(Int.self, forKey: .hiddenSize)
        numHiddenLayers = try c.decode(Int.self, forKey: .numHiddenLayers)
        numAttentionHeads = try c.decode(Int.self, forKey: .numAttentionHeads)
        intermediateSize = try c.decode(Int.self, forKey: .intermediateSize)
        imageSize = try square(.imageSize)
        patchSize = try square(.patchSize)
        numChannels = try c.decodeIfPresent(Int.self, forKey: .numChannels) ?? 3
        attentionBias = try c.decodeIfPresent(Bool.self, forKey: .attentionBias) ?? c.decodeIfPresent(Bool.self, forKey: .qkvBias) ?? true
        useQKNorm = try c.decodeIfPresent(Bool.self, forKey: .useQKNorm) ?? c.decodeIfPresent(Bool.self, forKey: .qkNormalization) ?? false
        normType = try c.decodeIfPresent(String.self, forKey: .normType) ?? "layer_norm"
        layerNormEps = try c.decodeIfPresent(Double.self, forKey: .layerNormEps) ?? 1e-6
        useMeanPooling = try c.decodeIfPresent(Bool.self, forKey: .useMeanPooling) ?? true
        hiddenAct = try c.decodeIfPresent(String.self, forKey: .hiddenAct) ?? "gelu"
        guard ["layer_norm", "rms_norm"].contains(normType) else { throw ModelError("vision norm_type '\(normType)' is not supported") }
        guard hiddenAct == "gelu" else { throw ModelError("vision hidden_act '\(hiddenAct)' is not supported (gelu)") }
        guard try c.decodeIfPresent(Bool.self, forKey: .useAbsolutePositionEmbeddings) ?? true else {
            throw ModelError("vision configs without absolute position embeddings are not supported")
        }
        try validate()
        guard hiddenSize % numAttentionHeads == 0, imageSize % patchSize == 0 else {
            throw ModelError("vision_config: hidden_size / heads or image_size / patch_size is not whole")
        }
    }

    var gridSize: Int { imageSize / patchSize }
}

public struct InternVLConfig: Sendable {
    public var vision: InternVisionConfig
    public var text: LlamaConfig
    /// The <IMG_CONTEXT> id; nil in remote-code configs, which leave it to the tokenizer.
    public var imageTokenId: Int?
    public var downsampleRatio = 0.5
    /// True for the original InternVLChatModel layout (its config also carries the tiling limits).
    public var remoteCode = false
    public var minTiles = 1, maxTiles = 12, useThumbnail = true

    /// Tokens one tile contributes after pixel shuffle: (448/14)² · 0.5² = 256 for InternVL3.
    public var tokensPerTile: Int {
        let side = Int((Double(vision.gridSize) * downsampleRatio).rounded())
        return side * side
    }

    /// Reads an `-hf` (model_type "internvl") or remote-code (model_type "internvl_chat") config.json.
    public init(contentsOf url: URL) throws {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw ModelError("\(url.path): cannot read (\(error.localizedDescription))")
        }
        try self.init(data: data, url: url)
    }

    /// Parses config.json bytes; `url` names the file in errors.
    public init(data: Data, url: URL) throws {
        func fail(_ why: String) -> ModelError { ModelError("\(url.path): \(why)") }
        let json: Any
        do { json = try parseJSON(data) } catch let e as ModelError { throw fail(e.message) }
        guard let obj = json as? [String: Any] else { throw fail("not a JSON object") }
        remoteCode = obj["llm_config"] != nil
        guard var textDict = (obj[remoteCode ? "llm_config" : "text_config"]) as? [String: Any],
              let visionDict = obj["vision_config"] as? [String: Any] else {
            throw fail("needs vision_config and text_config (or llm_config)")
        }
        // InternVL3 ships "dynamic" RoPE scaling, which only changes the frequencies beyond
        // max_position_embeddings (32k); below that it is plain RoPE, which is all we run.
        if let s = textDict["rope_scaling"] as? [String: Any], (s["rope_type"] ?? s["type"]) as? String == "dynamic" {
            textDict["rope_scaling"] = nil
        }
        if var p = textDict["rope_parameters"] as? [String: Any], p["rope_type"] as? String == "dynamic" {
            p["rope_type"] = "default"
            textDict["rope_parameters"] = p
        }
        do {
            text = try JSONDecoder().decode(LlamaConfig.self, from: JSONSerialization.data(withJSONObject: textDict))
            vision = try JSONDecoder().decode(InternVisionConfig.self, from: JSONSerialization.data(withJSONObject: visionDict))
        } catch let e as ModelError {
            throw fail(e.message)
        } catch {
            throw fail("cannot read the InternVL config (\(error))")
        }
        guard ["qwen2", "llama"].contains(text.modelType) else {
            throw fail("language model '\(text.modelType)' is not supported (Qwen2/Llama decoders only)")
        }
        imageTokenId = obj["image_token_id"] as? Int
        downsampleRatio = obj["downsample_ratio"] as? Double ?? 0.5
        if let act = obj["projector_hidden_act"] as? String, act != "gelu" { throw fail("projector_hidden_act '\(act)' is not supported") }
        // Features come from the last layer, CLS token dropped ("default"); other choices are not implemented.
        let layer = obj[remoteCode ? "select_layer" : "vision_feature_layer"]
        if let layer, layer as? Int != -1 { throw fail("vision feature layer \(layer) is not supported (-1 only)") }
        if let s = obj["vision_feature_select_strategy"] as? String, s != "default" { throw fail("vision_feature_select_strategy '\(s)' is not supported") }
        // ps_version v1 was an earlier pixel shuffle that leaves the result transposed.
        if let ps = obj["ps_version"] as? String, ps != "v2" { throw fail("ps_version '\(ps)' is not supported (v2)") }
        guard downsampleRatio > 0, downsampleRatio <= 1 else {
            throw fail("downsample_ratio \(downsampleRatio) is not in (0, 1]")
        }
        let k = 1 / downsampleRatio
        guard k == k.rounded(), vision.gridSize % Int(k) == 0 else {
            throw fail("downsample_ratio \(downsampleRatio) does not divide the \(vision.gridSize)-patch grid")
        }
        if remoteCode {
            minTiles = obj["min_dynamic_patch"] as? Int ?? 1
            maxTiles = obj["dynamic_image_size"] as? Bool == false ? 1 : obj["max_dynamic_patch"] as? Int ?? 12
            useThumbnail = obj["use_thumbnail"] as? Bool ?? true
            if let forced = obj["force_image_size"] as? Int, forced != vision.imageSize {
                throw fail("force_image_size \(forced) differs from the vision tower's \(vision.imageSize)")
            }
            do {
                try Self.checkTiling(tileSize: vision.imageSize, minTiles: minTiles, maxTiles: maxTiles)
            } catch let e as ModelError {
                throw fail(e.message)
            }
        }
    }
}

// MARK: - weight names

public enum InternVLWeights {
    /// Checkpoint name → name in this module tree, which is the on-disk layout of the `-hf` checkpoints
    /// (transformers 5 still writes it). `#` is a layer index, `*` the rest of the name. Remote-code rows
    /// follow transformers' convert_internvl_weights_to_hf.py; `attn.qkv` is one fused matrix whose rows
    /// are q, k, v in thirds.
    ///
    /// | checkpoint (remote code: InternVLChatModel)       | here (`-hf`)                                             |
    /// |----------------------------------------------------|----------------------------------------------------------|
    /// | vision_model.embeddings.class_embedding            | vision_tower.embeddings.cls_token                        |
    /// | vision_model.embeddings.position_embedding         | vision_tower.embeddings.position_embeddings              |
    /// | vision_model.embeddings.patch_embedding.*          | vision_tower.embeddings.patch_embeddings.projection.*    |
    /// | vision_model.encoder.layers.#.attn.qkv.*           | vision_tower.encoder.layer.#.attention.{q,k,v}_proj.*    |
    /// | vision_model.encoder.layers.#.attn.proj.*          | vision_tower.encoder.layer.#.attention.projection_layer.*|
    /// | vision_model.encoder.layers.#.attn.{q,k}_norm.*    | vision_tower.encoder.layer.#.attention.{q,k}_norm.*      |
    /// | vision_model.encoder.layers.#.mlp.*                | vision_tower.encoder.layer.#.mlp.*                       |
    /// | vision_model.encoder.layers.#.norm1.* / norm2.*    | vision_tower.encoder.layer.#.layernorm_before/after.*    |
    /// | vision_model.encoder.layers.#.ls1 / ls2            | vision_tower.encoder.layer.#.lambda_1 / lambda_2         |
    /// | mlp1.0.* / mlp1.1.* / mlp1.3.*                     | multi_modal_projector.layer_norm / linear_1 / linear_2.* |
    /// | language_model.* (Qwen2ForCausalLM)                | language_model.*                                         |
    /// | transformers 5 in-memory names: model.vision_tower.*, model.multi_modal_projector.*,          |
    /// | model.language_model.* → language_model.model.*, lm_head.weight → language_model.lm_head.weight |
    public static let renames: [(from: String, to: String)] = [
        ("vision_model.embeddings.class_embedding", "vision_tower.embeddings.cls_token"),
        ("vision_model.embeddings.position_embedding", "vision_tower.embeddings.position_embeddings"),
        ("vision_model.embeddings.patch_embedding.*", "vision_tower.embeddings.patch_embeddings.projection.*"),
        ("vision_model.encoder.layers.#.attn.qkv.*", "vision_tower.encoder.layer.#.attention.qkv.*"),
        ("vision_model.encoder.layers.#.attn.proj.*", "vision_tower.encoder.layer.#.attention.projection_layer.*"),
        ("vision_model.encoder.layers.#.attn.q_norm.*", "vision_tower.encoder.layer.#.attention.q_norm.*"),
        ("vision_model.encoder.layers.#.attn.k_norm.*", "vision_tower.encoder.layer.#.attention.k_norm.*"),
        ("vision_model.encoder.layers.#.mlp.*", "vision_tower.encoder.layer.#.mlp.*"),
        ("vision_model.encoder.layers.#.norm1.*", "vision_tower.encoder.layer.#.layernorm_before.*"),
        ("vision_model.encoder.layers.#.norm2.*", "vision_tower.encoder.layer.#.layernorm_after.*"),
        ("vision_model.encoder.layers.#.ls1", "vision_tower.encoder.layer.#.lambda_1"),
        ("vision_model.encoder.layers.#.ls2", "vision_tower.encoder.layer.#.lambda_2"),
        ("mlp1.0.*", "multi_modal_projector.layer_norm.*"),
        ("mlp1.1.*", "multi_modal_projector.linear_1.*"),
        ("mlp1.3.*", "multi_modal_projector.linear_2.*"),
        ("model.vision_tower.*", "vision_tower.*"),
        ("model.multi_modal_projector.*", "multi_modal_projector.*"),
        ("model.language_model.*", "language_model.model.*"),
        ("lm_head.weight", "language_model.lm_head.weight"),
    ]

    /// The name `renames` gives `key`, or nil when no row matches (already an `-hf` name).
    public static func rename(_ key: String) -> String? {
        let parts = key.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        for (from, to) in renames {
            guard let (layer, rest) = match(from.split(separator: ".").map(String.init), parts) else { continue }
            return to.split(separator: ".").flatMap { p -> [String] in
                p == "#" ? [layer ?? ""] : p == "*" ? rest : [String(p)]
            }.joined(separator: ".")
        }
        return nil
    }

    /// Matches dotted segments against a pattern with `#` (a layer index) and a trailing `*` (one or more segments).
    static func match(_ pattern: [String], _ parts: [String]) -> (layer: String?, rest: [String])? {
        var layer: String?
        for (i, p) in pattern.enumerated() {
            if p == "*" { return i < parts.count ? (layer, Array(parts[i...])) : nil }
            guard i < parts.count else { return nil }
            if p == "#" {
                guard Int(parts[i]) != nil else { return nil }
                layer = parts[i]
            } else if p != parts[i] {
                return nil
            }
        }
        return parts.count == pattern.count ? (layer, []) : nil
    }

    /// Renames a checkpoint's tensors to this module tree's names and splits fused q/k/v.
    public static func canonical(_ state: [String: Tensor]) throws -> [String: Tensor] {
        var out: [String: Tensor] = [:]
        for (key, t) in state {
            let name = rename(key) ?? key
            if name.contains(".attention.qkv.") {
                let parts = try t.chunk(3, dim: 0)
                for (p, x) in zip(["q", "k", "v"], parts) {
                    out[name.replacingOccurrences(of: ".attention.qkv.", with: ".attention.\(p)_proj.")] = x
                }
            } else {
                guard out[name] == nil else { throw ModelError("two checkpoint tensors map to \(name)") }
                out[name] = t
            }
        }
        return out
    }
}

// MARK: - vision tower (InternViT)

/// LayerNorm or RMSNorm, as the config says; both keep the checkpoint names `weight` (and `bias`).
public final class InternVisionNorm: Module, NormLayer {
    public let weight: Tensor, bias: Tensor?
    let rms: Bool, eps: Double

    init(_ dim: Int, rms: Bool, eps: Double) throws {
        self.rms = rms
        self.eps = eps
        weight = try Tensor.ones([dim])
        bias = rms ? nil : try Tensor.zeros([dim])
        super.init()
        register("weight", weight)
        if let bias { register("bias", bias) }
    }

    func callAsFunction(_ x: Tensor) throws -> Tensor {
        rms ? try F.rmsNorm(x, shape: [weight.size(0)], weight: weight, eps: eps)
            : try F.layerNorm(x, shape: [weight.size(0)], weight: weight, bias: bias, eps: eps)
    }
}

public final class InternVisionEmbeddings: Module {
    public let cls_token: Tensor, position_embeddings: Tensor
    public let projection: Conv2d

    init(_ c: InternVisionConfig) throws {
        cls_token = try Tensor.zeros([1, 1, c.hiddenSize])
        position_embeddings = try Tensor.zeros([1, c.gridSize * c.gridSize + 1, c.hiddenSize])
        projection = try Conv2d(c.numChannels, c.hiddenSize, kernel: (c.patchSize, c.patchSize), stride: (c.patchSize, c.patchSize))
        super.init()
        register("cls_token", cls_token)
        let patch = Module()
        patch.register("projection", projection)
        register("patch_embeddings", patch)
        register("position_embeddings", position_embeddings)
    }

    /// [N, C, S, S] → [N, 1 + (S/patch)², hidden].
    func callAsFunction(_ pixels: Tensor) throws -> Tensor {
        let n = pixels.size(0)
        let patches = try projection(pixels).flatten(from: 2).transpose(1, 2)
        let cls = try cls_token.expand([n, 1, cls_token.size(2)])
        return try Tensor.cat([cls, patches], dim: 1) + position_embeddings
    }
}

public final class InternVisionAttention: Module {
    public let q_proj: Linear, k_proj: Linear, v_proj: Linear, projection_layer: Linear
    public let q_norm: RMSNorm?, k_norm: RMSNorm?
    let heads: Int

    init(_ c: InternVisionConfig) throws {
        let d = c.hiddenSize
        heads = c.numAttentionHeads
        q_proj = try Linear(d, d, bias: c.attentionBias, initialize: false)
        k_proj = try Linear(d, d, bias: c.attentionBias, initialize: false)
        v_proj = try Linear(d, d, bias: c.attentionBias, initialize: false)
        projection_layer = try Linear(d, d, bias: true, initialize: false)
        // Over the whole width, not per head; HF leaves these at eps 1e-6 whatever layer_norm_eps says.
        q_norm = c.useQKNorm ? try RMSNorm(d, eps: 1e-6) : nil
        k_norm = c.useQKNorm ? try RMSNorm(d, eps: 1e-6) : nil
        super.init()
        register("q_proj", q_proj)
        register("k_proj", k_proj)
        register("v_proj", v_proj)
        register("projection_layer", projection_layer)
        if let q_norm, let k_norm {
            register("q_norm", q_norm)
            register("k_norm", k_norm)
        }
    }

    func callAsFunction(_ x: Tensor) throws -> Tensor {
        let (b, n, d) = (x.size(0), x.size(1), x.size(2))
        var q = try q_proj(x), k = try k_proj(x)
        if let q_norm, let k_norm {
            q = try q_norm(q)
            k = try k_norm(k)
        }
        func heads(_ t: Tensor) throws -> Tensor { try t.view([b, n, self.heads, d / self.heads]).transpose(1, 2) }
        let out = try F.scaledDotProductAttention(heads(q), heads(k), heads(v_proj(x)))
        return try projection_layer(out.transpose(1, 2).reshape([b, n, d]))
    }
}

public final class InternVisionMLP: Module {
    public let fc1: Linear, fc2: Linear
    init(_ c: InternVisionConfig) throws {
        fc1 = try Linear(c.hiddenSize, c.intermediateSize, initialize: false)
        fc2 = try Linear(c.intermediateSize, c.hiddenSize, initialize: false)
        super.init()
        register("fc1", fc1)
        register("fc2", fc2)
    }
    func callAsFunction(_ x: Tensor) throws -> Tensor { try fc2(fc1(x).gelu()) }
}

public final class InternVisionLayer: Module {
    public let attention: InternVisionAttention, mlp: InternVisionMLP
    public let layernorm_before: InternVisionNorm, layernorm_after: InternVisionNorm
    /// Layer scale: per-channel gains on each residual branch.
    public let lambda_1: Tensor, lambda_2: Tensor

    init(_ c: InternVisionConfig) throws {
        attention = try InternVisionAttention(c)
        mlp = try InternVisionMLP(c)
        layernorm_before = try InternVisionNorm(c.hiddenSize, rms: c.normType == "rms_norm", eps: c.layerNormEps)
        layernorm_after = try InternVisionNorm(c.hiddenSize, rms: c.normType == "rms_norm", eps: c.layerNormEps)
        lambda_1 = try Tensor.ones([c.hiddenSize])
        lambda_2 = try Tensor.ones([c.hiddenSize])
        super.init()
        register("attention", attention)
        register("mlp", mlp)
        register("layernorm_before", layernorm_before)
        register("layernorm_after", layernorm_after)
        register("lambda_1", lambda_1)
        register("lambda_2", lambda_2)
    }

    func callAsFunction(_ x: Tensor) throws -> Tensor {
        let h = try x + lambda_1 * attention(layernorm_before(x))
        return try h + lambda_2 * mlp(layernorm_after(h))
    }
}

public final class InternVisionModel: Module {
    public let config: InternVisionConfig
    public let embeddings: InternVisionEmbeddings
    public let layers: [InternVisionLayer]
    public let layernorm: LayerNorm?

    public init(_ c: InternVisionConfig) throws {
        config = c
        embeddings = try InternVisionEmbeddings(c)
        layers = try (0..<c.numHiddenLayers).map { _ in try InternVisionLayer(c) }
        layernorm = c.useMeanPooling ? nil : try LayerNorm(c.hiddenSize, eps: c.layerNormEps)
        super.init()
        register("embeddings", embeddings)
        let list = Module()
        for (i, l) in layers.enumerated() { list.register("\(i)", l) }
        let encoder = Module()
        encoder.register("layer", list)
        register("encoder", encoder)
        if let layernorm { register("layernorm", layernorm) }
    }

    /// Last hidden state [N, 1 + patches, hidden] (CLS first) for tiles [N, C, S, S].
    public func callAsFunction(_ pixels: Tensor) throws -> Tensor {
        // The position embeddings are learnt for S = image_size; the processor only makes such tiles,
        // so the bicubic interpolation HF applies to other sizes is not needed.
        guard pixels.rank == 4, pixels.size(2) == config.imageSize, pixels.size(3) == config.imageSize else {
            throw ModelError("InternViT expects [N, \(config.numChannels), \(config.imageSize), \(config.imageSize)] tiles, got \(pixels.shape)")
        }
        var h = try embeddings(pixels)
        for layer in layers { h = try layer(h) }
        return try layernorm?.callAsFunction(h) ?? h
    }
}

public final class InternVLProjector: Module {
    public let layer_norm: LayerNorm, linear_1: Linear, linear_2: Linear
    init(inputs: Int, hidden: Int) throws {
        layer_norm = try LayerNorm(inputs, eps: 1e-5) // nn.LayerNorm's default; the config has no eps for it
        linear_1 = try Linear(inputs, hidden, initialize: false)
        linear_2 = try Linear(hidden, hidden, initialize: false)
        super.init()
        register("layer_norm", layer_norm)
        register("linear_1", linear_1)
        register("linear_2", linear_2)
    }
    func callAsFunction(_ x: Tensor) throws -> Tensor { try linear_2(linear_1(layer_norm(x)).gelu()) }
}

fileprivate extension Tensor {
    /// Merges dims `from`... into one.
    func flatten(from dim: Int) throws -> Tensor { try reshape(Array(shape[..<dim]) + [-1]) }
}

// MARK: - the model

public final class InternVL: Module, VisionLanguageModel, ChatTemplated {
    public let config: InternVLConfig
    public let vision_tower: InternVisionModel
    public let multi_modal_projector: InternVLProjector
    public let language_model: LlamaForCausalLM
    public let tokenizer: Tokenizer
    public let processor: InternVLImageProcessor
    public let stopIds: Set<Int>
    /// System turn used when `prepare` gets none; nil leaves it to the chat template (the original
    /// checkpoints' template has its own default system message, the `-hf` one has none).
    public var defaultSystemPrompt: String?
    /// The checkpoint's template (ttrv's built-in ChatML when it has none).
    public var chatTemplate: ChatTemplate = .chatML
    public let imageTokenId: Int, imageStartId: Int, imageEndId: Int

    public var lm: CausalLM { language_model }
    public var module: Module { self }
    public var parts: ModelParts {
        ModelParts(vision: [vision_tower], projector: [multi_modal_projector], language: language_model)
    }
    /// The reference trains InternVL's projector and language model; the vision tower stays frozen.
    public var defaultTrainedParts: [ModelPart] { [.projector, .lm] }
    public func clearImageCache() { featureCache.removeAll() }

    public init(_ config: InternVLConfig, tokenizer: Tokenizer, processor: InternVLImageProcessor) throws {
        self.config = config
        self.tokenizer = tokenizer
        self.processor = processor
        vision_tower = try InternVisionModel(config.vision)
        let k = Int((1 / config.downsampleRatio).rounded())
        multi_modal_projector = try InternVLProjector(inputs: config.vision.hiddenSize * k * k, hidden: config.text.hiddenSize)
        language_model = try LlamaForCausalLM(config.text)
        func id(_ token: String) throws -> Int {
            guard let id = tokenizer.id(of: token) else { throw ModelError("the tokenizer has no \(token) token") }
            return id
        }
        imageStartId = try id("<img>")
        imageEndId = try id("</img>")
        imageTokenId = try config.imageTokenId ?? id("<IMG_CONTEXT>")
        guard tokenizer.id(of: "<IMG_CONTEXT>") == imageTokenId else {
            throw ModelError("image_token_id \(imageTokenId) is not the tokenizer's <IMG_CONTEXT>")
        }
        stopIds = LMLoader.stopIds(tokenizer, eos: config.text.eosTokenId)
        super.init()
        register("vision_tower", vision_tower)
        register("multi_modal_projector", multi_modal_projector)
        register("language_model", language_model)
    }

    /// Loads an `-hf` or remote-code InternVL directory: config.json, safetensors, tokenizer.json and,
    /// for `-hf`, preprocessor_config.json. The vision tower comes back frozen.
    public static func load(_ dir: URL) throws -> InternVL {
        let configURL = dir.appendingPathComponent("config.json")
        var config = try InternVLConfig(contentsOf: configURL)
        try config.text.checkFits(weightBytes: try LMLoader.weightBytes(dir), bitsPerParameter: 8, file: configURL.path)
        let state = try InternVLWeights.canonical(LMLoader.readSafeTensorsDir(dir))
        // Tie exactly when the checkpoint has no lm_head, which is what transformers ends up doing
        // whatever the (top-level or text) tie_word_embeddings flags say.
        config.text.tieWordEmbeddings = state["language_model.lm_head.weight"] == nil
        let tokenizer = try Tokenizer(tokenizerJSON: dir.appendingPathComponent("tokenizer.json"))
        let pre = dir.appendingPathComponent("preprocessor_config.json")
        let processor = !config.remoteCode && FileManager.default.fileExists(atPath: pre.path)
            ? try InternVLImageProcessor(preprocessorConfig: pre, tileSize: config.vision.imageSize)
            : InternVLImageProcessor(tileSize: config.vision.imageSize, minTiles: config.minTiles, maxTiles: config.maxTiles,
                                     useThumbnail: config.useThumbnail)
        guard processor.tileSize == config.vision.imageSize else {
            throw ModelError("\(pre.path): tile size \(processor.tileSize) differs from the vision tower's \(config.vision.imageSize)")
        }
        let model = try InternVL(config, tokenizer: tokenizer, processor: processor)
        model.chatTemplate = try ChatTemplate.find(in: dir) ?? .fallback(.chatML, for: dir.path)
        var report = try model.load(state, strict: false)
        report.unexpected = report.unexpected.filter { !$0.hasSuffix("rotary_emb.inv_freq") }
        guard report.isClean else { throw ModelError("\(dir.path): weights do not match the config: \(report)") }
        try model.vision_tower.freeze()
        return model
    }

    // MARK: vision

    /// Image embeddings for tiles [N, 3, S, S]: [N, tokensPerTile, text hidden].
    public func imageFeatures(_ pixels: Tensor) throws -> Tensor {
        try multi_modal_projector(visionTokens(pixels))
    }

    /// Pixel-shuffled tower output [N, tokensPerTile, vision hidden · k²], before the projector.
    func visionTokens(_ pixels: Tensor) throws -> Tensor {
        // A frozen tower needs no graph; keeping one would hold every layer's activations for all tiles.
        let hidden = visionTowerTrainable ? try vision_tower(pixels) : try noGrad { try vision_tower(pixels) }
        return try pixelShuffle(hidden.narrow(dim: 1, start: 1, length: hidden.size(1) - 1))
    }

    var visionTowerTrainable: Bool { vision_tower.parameters.contains { $0.requiresGrad } }

    /// Embeddings of one image's tiles. Adapt prepares the same image for many rollouts, so the frozen
    /// tower's output is kept for the few most recent images (bounded: one InternVL3 image at 13 tiles
    /// is 13 × 256 × 4096 floats, 54 MB).
    public func imageEmbeddings(_ image: Image) throws -> Tensor {
        try multi_modal_projector(featureCache.features(image, tower: [vision_tower]) {
            try visionTokens(processor.pixelValues(image))
        })
    }

    let featureCache = ImageFeatureCache(capacity: 4)

    /// [N, g², C] patch features → [N, (g/k)², C·k²] with k = 1/downsample_ratio: each output token
    /// stacks a k×k neighbourhood, in the channel order of HF's pixel_shuffle (ps_version v2).
    func pixelShuffle(_ x: Tensor) throws -> Tensor {
        let (n, c) = (x.size(0), x.size(2))
        let g = config.vision.gridSize, k = Int((1 / config.downsampleRatio).rounded())
        return try x.reshape([n, g, g / k, c * k]).transpose(1, 2)
            .reshape([n, g / k, g / k, c * k * k]).transpose(1, 2)
            .reshape([n, (g / k) * (g / k), c * k * k])
    }

    // MARK: prompts

    /// Prompt ids for one user turn with an image of `tiles` tiles (nil: none); the image becomes <img>,
    /// tiles × tokensPerTile <IMG_CONTEXT>, </img>, as InternVL's processors write it. "<image>" in `text`
    /// marks where the image goes (first when absent). An `-hf` checkpoint's template gets the image as
    /// a content part and emits <IMG_CONTEXT> for it (InternVLProcessor expands that); the original
    /// checkpoints and the built-in rules take "<image>" in the text (prepended with a newline when
    /// absent, as the original chat() does), expanded after rendering.
    public func promptIds(text: String, tiles: Int?, system: String?) throws -> [Int] {
        if let tiles, tiles <= 0 { throw ModelError("an image needs at least one tile") }
        let images = tiles == nil ? 0 : 1
        let system = (system ?? defaultSystemPrompt).map { [ChatMessage.system($0)] } ?? []
        let slot = "<img><IMG_CONTEXT></img>"
        var rendered: String
        if config.remoteCode || chatTemplate.isBuiltin {
            var content = text
            if images > 0, !content.contains("<image>") { content = "<image>\n" + content }
            rendered = try chatTemplate.render(system + [.user(content)], addGenerationPrompt: true)
            guard images == 0 || rendered.components(separatedBy: "<image>").count == 2 else {
                throw ModelError("\(chatTemplate.origin): the rendered prompt must hold one <image> for the image")
            }
            if images > 0 { rendered = rendered.replacingOccurrences(of: "<image>", with: slot) }
        } else {
            rendered = try chatTemplate.render(system + [.user(parts: text, images: images)], addGenerationPrompt: true)
            rendered = rendered.replacingOccurrences(of: "<IMG_CONTEXT>", with: slot)
        }
        let ids = tokenizer.encode(rendered)
        let slots = ids.filter { $0 == imageTokenId }.count
        guard slots == images else {
            throw ModelError("\(chatTemplate.origin): the prompt has \(slots) image slot(s) (<IMG_CONTEXT>) for \(images) image(s)")
        }
        guard let tiles, let at = ids.firstIndex(of: imageTokenId) else { return ids }
        return Array(ids[..<at]) + Array(repeating: imageTokenId, count: tiles * config.tokensPerTile) + Array(ids[(at + 1)...])
    }

    /// Token embeddings [1, T, hidden] with `features` ([N, tokensPerTile, hidden]) written, in order,
    /// over the <IMG_CONTEXT> positions.
    public func embed(ids: [Int], features: Tensor?) throws -> Tensor {
        let text = try language_model.embed(Tensor(ids.map { Int64($0) }, shape: [ids.count])) // [T, H]
        let slots = ids.indices.filter { ids[$0] == imageTokenId }
        guard let features else {
            guard slots.isEmpty else { throw ModelError("\(slots.count) image tokens but no image") }
            return try text.unsqueeze(0)
        }
        let flat = try features.reshape([-1, features.size(-1)])
        guard flat.size(0) == slots.count else {
            throw ModelError("\(slots.count) image tokens for \(flat.size(0)) image features")
        }
        // One gather over [text; features] keeps the result differentiable in both.
        var source = Array(0..<ids.count)
        for (k, i) in slots.enumerated() { source[i] = ids.count + k }
        let index = try Tensor(source.map { Int64($0) }, shape: [source.count])
        return try Tensor.cat([text, flat.to(text.dtype)], dim: 0).indexSelect(dim: 0, index: index).unsqueeze(0)
    }

    public func prepare(text: String, image: Image?, system: String?) throws -> PreparedPrompt {
        let features = try image.map { try imageEmbeddings($0) }
        let ids = try promptIds(text: text, tiles: features?.size(0), system: system)
        // Past this length InternVL3's "dynamic" RoPE would rescale frequencies, which is not implemented.
        guard ids.count <= config.text.maxPositionEmbeddings else {
            throw ModelError("prompt of \(ids.count) tokens exceeds max_position_embeddings \(config.text.maxPositionEmbeddings)")
        }
        let embeddings = try embed(ids: ids, features: features)
        return PreparedPrompt(embeddings: embeddings, positions: try Tensor.arange(ids.count).unsqueeze(0),
                              nextPosition: ids.count, tokenIds: ids.map { $0 == imageTokenId ? -1 : $0 })
    }
}
