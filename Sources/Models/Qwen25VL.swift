import Foundation
import Torch

// Qwen2.5-VL: a window-attention ViT whose 2×2-merged patch features replace <|image_pad|>
// tokens in a Qwen2 decoder that uses multimodal RoPE (separate temporal/height/width
// positions for image tokens). Weight names follow HF checkpoints.

// MARK: - configuration

public struct Qwen25VLVisionConfig: Sendable {
    public var depth: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var numHeads: Int
    public var outHiddenSize: Int
    public var inChannels = 3
    public var patchSize = 14
    public var temporalPatchSize = 2
    public var spatialMergeSize = 2
    public var windowSize = 112
    public var fullAttentionBlocks: [Int] = [7, 15, 23, 31]
    public var hiddenAct = "silu"
    public var ropeTheta = 10_000.0

    public var headDim: Int { hiddenSize / numHeads }
    /// Side of an attention window, in merged tokens.
    public var windowMergedTokens: Int { windowSize / spatialMergeSize / patchSize }
    public var patchDim: Int { inChannels * temporalPatchSize * patchSize * patchSize }
}

public struct Qwen25VLConfig: Sendable {
    /// The decoder, as the Qwen2 config it is (q/k/v biases, no scaling).
    public var text: LlamaConfig
    /// Split of the rotary half-dimension between temporal, height and width positions.
    public var mropeSection: [Int]
    public var vision: Qwen25VLVisionConfig
    public var imageTokenId = 151_655
    public var videoTokenId = 151_656
    public var visionStartTokenId = 151_652
    public var visionEndTokenId = 151_653
    public var tieWordEmbeddings: Bool

    /// Reads both config.json forms: the flat one of the Hub checkpoints (text fields at the
    /// root, `rope_scaling: {type: mrope}`) and transformers 5's nested `text_config`.
    public init(json data: Data) throws {
        guard let root = try parseJSON(data) as? [String: Any] else {
            throw ModelError("config is not a JSON object")
        }
        var text = root["text_config"] as? [String: Any] ?? root
        let rope = (text["rope_parameters"] ?? text["rope_scaling"] ?? root["rope_scaling"]) as? [String: Any] ?? [:]
        for kind in [rope["rope_type"], rope["type"]].compactMap({ $0 as? String }) where !["default", "mrope"].contains(kind) {
            throw ModelError("rope type '\(kind)' is not supported for Qwen2.5-VL")
        }
        guard let section = (rope["mrope_section"] as? [NSNumber])?.map(\.intValue) else {
            throw ModelError("config has no mrope_section")
        }
        mropeSection = section
        for s in section { try ConfigLimits.check("mrope_section entry", s, 0...4096) }
        // LlamaConfig rejects non-default rope types; M-RoPE is handled here, so hand it only the theta.
        let theta = (text["rope_theta"] as? NSNumber)?.doubleValue ?? (rope["rope_theta"] as? NSNumber)?.doubleValue ?? 1_000_000
        text["rope_theta"] = theta
        text.removeValue(forKey: "rope_scaling")
        text.removeValue(forKey: "rope_parameters")
        text.removeValue(forKey: "head_dim") // HF derives it from hidden_size / heads for this model
        self.text = try JSONDecoder().decode(LlamaConfig.self, from: JSONSerialization.data(withJSONObject: text))
        self.text.modelType = "qwen2"
        self.text.attentionBias = true
        guard section.reduce(0, +) * 2 == self.text.resolvedHeadDim else {
            throw ModelError("mrope_section \(section) does not cover head dim \(self.text.resolvedHeadDim)")
        }
        // Pre-v5 saves keep tie_word_embeddings in text_config, v5 at the root; either means tied.
        tieWordEmbeddings = (root["tie_word_embeddings"] as? Bool ?? false) || (text["tie_word_embeddings"] as? Bool ?? false)
        func int(_ key: String, _ d: [String: Any] = root) -> Int? { (d[key] as? NSNumber)?.intValue }
        imageTokenId = int("image_token_id") ?? imageTokenId
        videoTokenId = int("video_token_id") ?? videoTokenId
        visionStartTokenId = int("vision_start_token_id") ?? visionStartTokenId
        visionEndTokenId = int("vision_end_token_id") ?? visionEndTokenId

        guard let v = root["vision_config"] as? [String: Any] else { throw ModelError("config has no vision_config") }
        func need(_ key: String) throws -> Int {
            guard let x = int(key, v) else { throw ModelError("vision_config has no \(key)") }
            return x
        }
        vision = Qwen25VLVisionConfig(depth: try need("depth"), hiddenSize: try need("hidden_size"),
                                      intermediateSize: try need("intermediate_size"), numHeads: try need("num_heads"),
                                      outHiddenSize: try need("out_hidden_size"))
        vision.inChannels = int("in_channels", v) ?? int("in_chans", v) ?? 3
        vision.patchSize = int("patch_size", v) ?? 14
        vision.temporalPatchSize = int("temporal_patch_size", v) ?? 2
        vision.spatialMergeSize = int("spatial_merge_size", v) ?? 2
        vision.windowSize = int("window_size", v) ?? 112
        vision.fullAttentionBlocks = (v["fullatt_block_indexes"] as? [NSNumber])?.map(\.intValue) ?? vision.fullAttentionBlocks
        vision.hiddenAct = v["hidden_act"] as? String ?? "silu"
        vision.ropeTheta = ((v["rope_parameters"] as? [String: Any])?["rope_theta"] as? NSNumber)?.doubleValue ?? 10_000
        try vision.validate(mropeSection: section)
        guard vision.windowMergedTokens > 0, vision.hiddenSize % vision.numHeads == 0, vision.headDim % 4 == 0 else {
            throw ModelError("vision_config is inconsistent (window \(vision.windowSize), heads \(vision.numHeads))")
        }
    }
}

// MARK: - vision tower

/// The vision MLP's activation by its HF name (Qwen2.5-VL ships "silu").
func qwenVisionActivation(_ name: String, _ x: Tensor) throws -> Tensor {
    switch name {
    case "silu", "swish": return try x.silu()
    case "gelu": return try x.gelu()
    case "gelu_pytorch_tanh", "gelu_new": return try x.gelu(tanh: true)
    case "quick_gelu": return try x * (x * 1.702).sigmoid()
    default: throw ModelError("activation '\(name)' is not supported")
    }
}

public final class Qwen25VisionAttention: Module {
    public let qkv: Linear, proj: Linear
    let heads: Int

    init(_ c: Qwen25VLVisionConfig) throws {
        heads = c.numHeads
        qkv = try Linear(c.hiddenSize, 3 * c.hiddenSize, initialize: false)
        proj = try Linear(c.hiddenSize, c.hiddenSize, initialize: false)
        super.init()
        register("qkv", qkv)
        register("proj", proj)
    }

    /// x [N, hidden]; RoPE tables [1, 1, N, headDim]; patches attend only within their group.
    func callAsFunction(_ x: Tensor, rope: RotaryAngles, groups: Qwen25AttentionGroups) throws -> Tensor {
        let n = x.size(0)
        let parts = try qkv(x).view([n, 3, heads, -1]).permute([1, 2, 0, 3]).unsqueeze(1) // [3, 1, H, N, hd]
        let q = try Rotary.apply(parts.select(dim: 0, index: 0), rope)
        let k = try Rotary.apply(parts.select(dim: 0, index: 1), rope)
        let out = try groups.attend(q, k, parts.select(dim: 0, index: 2))
        return try proj(out.squeeze(0).transpose(0, 1).reshape([n, -1]))
    }
}

/// Attention restricted to contiguous runs of patches (windows, or frames for the full-attention
/// blocks). Runs are batched, padded to the longest, instead of masking an N×N matrix: a real
/// image has thousands of patches but windows of at most 64.
struct Qwen25AttentionGroups {
    let count: Int, width: Int
    /// Padded slot → patch, when runs differ in length.
    let gather: Tensor?
    /// Patch → padded slot.
    let scatter: Tensor?
    /// [count, 1, 1, width], true for real keys.
    let keyMask: Tensor?

    /// `segments`: a group id per patch, equal ids adjacent.
    init(segments: [Int]) throws {
        var lengths: [Int] = []
        for (i, s) in segments.enumerated() {
            if i > 0, s == segments[i - 1] { lengths[lengths.count - 1] += 1 } else { lengths.append(1) }
        }
        let width = lengths.max() ?? 0
        count = lengths.count
        self.width = width
        guard lengths.contains(where: { $0 != width }) else {
            (gather, scatter, keyMask) = (nil, nil, nil)
            return
        }
        var gather: [Int64] = [], scatter: [Int64] = [], valid: [Bool] = [], start = 0
        for (g, len) in lengths.enumerated() {
            gather += (0..<width).map { Int64(start + Swift.min($0, len - 1)) }
            scatter += (0..<len).map { Int64(g * width + $0) }
            valid += (0..<width).map { $0 < len }
            start += len
        }
        self.gather = try Tensor(gather)
        self.scatter = try Tensor(scatter)
        keyMask = try Tensor(valid, shape: [count, 1, 1, width])
    }

    /// q, k, v [1, H, N, hd] → [1, H, N, hd].
    func attend(_ q: Tensor, _ k: Tensor, _ v: Tensor) throws -> Tensor {
        if count == 1 { return try F.scaledDotProductAttention(q, k, v) }
        let (h, hd) = (q.size(1), q.size(3))
        func batched(_ x: Tensor) throws -> Tensor {
            try (gather.map { try x.indexSelect(dim: 2, index: $0) } ?? x).reshape([h, count, width, hd]).transpose(0, 1)
        }
        let out = try F.scaledDotProductAttention(batched(q), batched(k), batched(v), mask: keyMask)
        let flat = try out.transpose(0, 1).reshape([1, h, count * width, hd])
        return try scatter.map { try flat.indexSelect(dim: 2, index: $0) } ?? flat
    }
}

public final class Qwen25VisionMLP: Module {
    public let gate_proj: Linear, up_proj: Linear, down_proj: Linear
    let act: String
    init(_ c: Qwen25VLVisionConfig) throws {
        act = c.hiddenAct
        gate_proj = try Linear(c.hiddenSize, c.intermediateSize, initialize: false)
        up_proj = try Linear(c.hiddenSize, c.intermediateSize, initialize: false)
        down_proj = try Linear(c.intermediateSize, c.hiddenSize, initialize: false)
        super.init()
        register("gate_proj", gate_proj)
        register("up_proj", up_proj)
        register("down_proj", down_proj)
    }
    func callAsFunction(_ x: Tensor) throws -> Tensor { try down_proj(qwenVisionActivation(act, gate_proj(x)) * up_proj(x)) }
}

public final class Qwen25VisionBlock: Module {
    public let norm1: RMSNorm, norm2: RMSNorm, attn: Qwen25VisionAttention, mlp: Qwen25VisionMLP
    init(_ c: Qwen25VLVisionConfig) throws {
        norm1 = try RMSNorm(c.hiddenSize, eps: 1e-6)
        norm2 = try RMSNorm(c.hiddenSize, eps: 1e-6)
        attn = try Qwen25VisionAttention(c)
        mlp = try Qwen25VisionMLP(c)
        super.init()
        register("norm1", norm1)
        register("norm2", norm2)
        register("attn", attn)
        register("mlp", mlp)
    }
    func callAsFunction(_ x: Tensor, rope: RotaryAngles, groups: Qwen25AttentionGroups) throws -> Tensor {
        let h = try x + attn(norm1(x), rope: rope, groups: groups)
        return try h + mlp(norm2(h))
    }
}

/// Where each patch goes for window attention, and its rotary coordinates.
struct Qwen25VisionLayout {
    /// Merged-token order after windowing: window by window, row-major inside a window.
    var windowIndex: [Int] = []
    /// Per patch, in windowed order.
    var window: [Int] = [], frame: [Int] = [], row: [Int] = [], col: [Int] = []

    init(grids: [(t: Int, h: Int, w: Int)], merge m: Int, windowSide side: Int) {
        var unitOffset = 0, windowId = 0, frameId = 0
        for g in grids {
            let lh = g.h / m, lw = g.w / m
            for ti in 0..<g.t {
                for wy in stride(from: 0, to: lh, by: side) {
                    for wx in stride(from: 0, to: lw, by: side) {
                        for y in wy..<min(wy + side, lh) {
                            for x in wx..<min(wx + side, lw) {
                                windowIndex.append(unitOffset + (ti * lh + y) * lw + x)
                                // The processor emits each merged token's m×m patches contiguously, row-major.
                                for mh in 0..<m {
                                    for mw in 0..<m {
                                        row.append(y * m + mh)
                                        col.append(x * m + mw)
                                        window.append(windowId)
                                        frame.append(frameId)
                                    }
                                }
                            }
                        }
                        windowId += 1
                    }
                }
                frameId += 1
            }
            unitOffset += g.t * lh * lw
        }
    }
}

public final class Qwen25VisionTransformer: Module {
    public let config: Qwen25VLVisionConfig
    /// Conv3d weight [hidden, C, T, P, P]; stride equals kernel, so it is a linear map of a flattened patch.
    public let patchWeight: Tensor
    public let blocks: [Qwen25VisionBlock]
    public let ln_q: RMSNorm, mlp0: Linear, mlp2: Linear
    /// The tower proper (patch embedding and blocks) and the merger, which is Qwen's projector.
    public let tower: [Module], merger: Module
    let invFreq: Tensor

    init(_ c: Qwen25VLVisionConfig) throws {
        config = c
        patchWeight = try Tensor.empty([c.hiddenSize, c.inChannels, c.temporalPatchSize, c.patchSize, c.patchSize])
        blocks = try (0..<c.depth).map { _ in try Qwen25VisionBlock(c) }
        let merged = c.hiddenSize * c.spatialMergeSize * c.spatialMergeSize
        ln_q = try RMSNorm(c.hiddenSize, eps: 1e-6)
        mlp0 = try Linear(merged, merged, initialize: false)
        mlp2 = try Linear(merged, c.outHiddenSize, initialize: false)
        // Height and width each rotate a quarter of the head dim's frequencies.
        invFreq = try Rotary(headDim: c.headDim / 2, theta: c.ropeTheta).invFreq
        let embed = Module(), proj = Module(), list = Module(), merger = Module(), mlp = Module()
        tower = [embed, list]
        self.merger = merger
        super.init()
        proj.register("weight", patchWeight)
        embed.register("proj", proj)
        register("patch_embed", embed)
        for (i, b) in blocks.enumerated() { list.register("\(i)", b) }
        register("blocks", list)
        merger.register("ln_q", ln_q)
        mlp.register("0", mlp0)
        mlp.register("2", mlp2)
        merger.register("mlp", mlp)
        register("merger", merger)
    }

    /// Patches [N, C·T·P·P] in the processor's order, for images with the given (t, h, w) patch
    /// grids → merged features [N / merge², outHidden] in the same order.
    public func callAsFunction(_ pixels: Tensor, grids: [(t: Int, h: Int, w: Int)]) throws -> Tensor {
        let c = config, unit = c.spatialMergeSize * c.spatialMergeSize
        let n = pixels.size(0)
        guard n == grids.reduce(0, { $0 + $1.t * $1.h * $1.w }), pixels.size(1) == c.patchDim else {
            throw ModelError("vision: pixels \(pixels.shape) do not match grids \(grids)")
        }
        let layout = Qwen25VisionLayout(grids: grids, merge: c.spatialMergeSize, windowSide: c.windowMergedTokens)
        let order = try Tensor(layout.windowIndex.map { Int64($0) })
        var x = try F.linear(pixels, patchWeight.reshape([c.hiddenSize, -1]))
        x = try x.view([n / unit, unit, -1]).indexSelect(dim: 0, index: order).reshape([n, -1])

        let rows = try Tensor(layout.row.map { Int64($0) }).to(.float32).unsqueeze(1) * invFreq
        let cols = try Tensor(layout.col.map { Int64($0) }).to(.float32).unsqueeze(1) * invFreq
        let rope = try RotaryAngles(half: Tensor.cat([rows, cols], dim: 1).unsqueeze(0).unsqueeze(0)) // [1, 1, N, hd/2]

        let windows = try Qwen25AttentionGroups(segments: layout.window)
        let frames = try Qwen25AttentionGroups(segments: layout.frame)
        for (i, block) in blocks.enumerated() {
            x = try block(x, rope: rope, groups: c.fullAttentionBlocks.contains(i) ? frames : windows)
        }
        let merged = try mlp2(mlp0(ln_q(x).reshape([n / unit, -1])).gelu())
        let inverse = try order.sort().indices
        return try merged.indexSelect(dim: 0, index: inverse)
    }
}

// MARK: - the whole network

/// HF's Qwen2_5_VLForConditionalGeneration. Parameters are named as in transformers 5
/// (`model.visual.*`, `model.language_model.*`, `lm_head.weight`); `load` also accepts the
/// `visual.*` / `model.*` names the Hub checkpoints use.
public final class Qwen2_5_VLForConditionalGeneration: Module, CausalLM {
    public let config: Qwen25VLConfig
    public let visual: Qwen25VisionTransformer
    public let languageModel: LlamaModel
    public let head: OutputHead
    public var lmHead: Tensor { head.weight }
    let rotary: Rotary

    public init(_ config: Qwen25VLConfig) throws {
        self.config = config
        visual = try Qwen25VisionTransformer(config.vision)
        languageModel = try LlamaModel(config.text)
        rotary = try Rotary(headDim: config.text.resolvedHeadDim, theta: config.text.ropeTheta)
        head = OutputHead(weight: config.tieWordEmbeddings ? languageModel.embed_tokens.weight
                          : try Tensor.empty([config.text.vocabSize, config.text.hiddenSize]))
        super.init()
        let model = Module()
        model.register("visual", visual)
        model.register("language_model", languageModel)
        register("model", model)
        if !config.tieWordEmbeddings {
            let head = Module()
            head.register("weight", lmHead)
            register("lm_head", head)
        }
    }

    /// Checkpoint name → parameter name (the Hub layout predates `model.language_model`).
    public static func currentName(_ name: String) -> String {
        if name.hasPrefix("visual.") { return "model." + name }
        if name.hasPrefix("model."), !name.hasPrefix("model.language_model."), !name.hasPrefix("model.visual.") {
            return "model.language_model." + name.dropFirst("model.".count)
        }
        return name
    }

    public var layerCount: Int { config.text.numHiddenLayers }
    public var hiddenSize: Int { config.text.hiddenSize }
    public var vocabSize: Int { config.text.vocabSize }

    public func embed(_ ids: Tensor) throws -> Tensor { try languageModel.embed_tokens(ids) }

    /// RoPE tables [B, 1, T, hd] for positions [B, T] (one position for all sections, as text and
    /// decode steps have) or [3, B, T] (temporal, height, width).
    func angles(_ positions: Tensor) throws -> RotaryAngles {
        guard positions.rank == 3 else { return try rotary.angles(positions) }
        guard positions.size(0) == 3 else { throw ModelError("M-RoPE positions must be [3, B, T], got \(positions.shape)") }
        let freqs = try positions.to(.float32).unsqueeze(-1) * rotary.invFreq // [3, B, T, hd/2]
        var start = 0
        let pieces = try config.mropeSection.enumerated().map { i, n in
            defer { start += n }
            return try freqs.select(dim: 0, index: i % 3).narrow(dim: -1, start: start, length: n)
        }
        return try RotaryAngles(half: Tensor.cat(pieces, dim: -1).unsqueeze(1))
    }

    public func forward(embeddings: Tensor, positions: Tensor, cache: KVCache?, valid: Tensor?) throws -> Tensor {
        return try languageModel.decode(embeddings, rope: angles(positions), cache: cache, valid: valid)
    }

    /// In fp32 under every precision: bf16 logits resolve only 0.125 near 25, which turns close calls into ties.
}

// MARK: - image processor

/// HF's Qwen2VLImageProcessor (the PIL one): smart_resize to multiples of patch·merge, bicubic
/// resize, CLIP normalisation, and patches flattened merge-block by merge-block with the still
/// image repeated over the temporal patch.
public struct Qwen25VLImageProcessor: Sendable {
    public var minPixels = 56 * 56
    public var maxPixels = 28 * 28 * 1280
    public var patchSize = 14
    public var temporalPatchSize = 2
    public var mergeSize = 2
    public var mean: [Float] = [0.48145466, 0.4578275, 0.40821073]
    public var std: [Float] = [0.26862954, 0.26130258, 0.27577711]

    public init() {}

    /// preprocessor_config.json; top-level min/max_pixels win over `size`, as in HF.
    public init(json data: Data) throws {
        guard let d = try parseJSON(data) as? [String: Any] else {
            throw ModelError("preprocessor config is not a JSON object")
        }
        func int(_ k: String, _ dict: [String: Any]? = nil) -> Int? { ((dict ?? d)[k] as? NSNumber)?.intValue }
        let size = d["size"] as? [String: Any]
        minPixels = int("min_pixels") ?? size.flatMap { int("shortest_edge", $0) } ?? minPixels
        maxPixels = int("max_pixels") ?? size.flatMap { int("longest_edge", $0) } ?? maxPixels
        patchSize = int("patch_size") ?? patchSize
        temporalPatchSize = int("temporal_patch_size") ?? temporalPatchSize
        mergeSize = int("merge_size") ?? mergeSize
        if let m = d["image_mean"] as? [NSNumber] { mean = m.map(\.floatValue) }
        if let s = d["image_std"] as? [NSNumber] { std = s.map(\.floatValue) }
        try validate()
    }

    /// Output (height, width): multiples of `factor`, aspect kept, pixel count within bounds.
    /// Python's round() is half-to-even, so 2.5 patches round to 2.
    public static func smartResize(height: Int, width: Int, factor: Int, minPixels: Int, maxPixels: Int) throws -> (Int, Int) {
        guard height > 0, width > 0 else { throw ModelError("image has no pixels") }
        guard Double(max(height, width)) / Double(min(height, width)) <= 200 else {
            throw ModelError("image aspect ratio \(width)x\(height) exceeds 200")
        }
        let f = Double(factor), h = Double(height), w = Double(width)
        var hBar = Int((h / f).rounded(.toNearestOrEven)) * factor
        var wBar = Int((w / f).rounded(.toNearestOrEven)) * factor
        if hBar * wBar > maxPixels {
            let beta = ((h * w) / Double(maxPixels)).squareRoot()
            hBar = max(factor, Int((h / beta / f).rounded(.down)) * factor)
            wBar = max(factor, Int((w / beta / f).rounded(.down)) * factor)
        } else if hBar * wBar < minPixels {
            let beta = (Double(minPixels) / (h * w)).squareRoot()
            hBar = Int((h * beta / f).rounded(.up)) * factor
            wBar = Int((w * beta / f).rounded(.up)) * factor
        }
        return (hBar, wBar)
    }

    /// pixel_values [gridH·gridW, C·T·P·P] and image_grid_thw.
    public func callAsFunction(_ image: Image) throws -> (pixels: Tensor, grid: (t: Int, h: Int, w: Int)) {
        let rgb = image.rgb()
        let (h, w) = try Self.smartResize(height: rgb.height, width: rgb.width, factor: patchSize * mergeSize,
                                          minPixels: minPixels, maxPixels: maxPixels)
        let resized = rgb.resized(width: w, height: h, filter: .bicubic)
        let p = patchSize, m = mergeSize, gh = h / p, gw = w / p
        let chw = try Tensor(resized.floatCHW(mean: mean, std: std), shape: [3, gh / m, m, p, gw / m, m, p])
        let patches = try chw.permute([1, 4, 2, 5, 0, 3, 6]).unsqueeze(5)
            .expand([gh / m, gw / m, m, m, 3, temporalPatchSize, p, p])
            .reshape([gh * gw, 3 * temporalPatchSize * p * p])
        return (patches, (1, gh, gw))
    }
}

// MARK: - the VLM

public final class Qwen25VL: VisionLanguageModel, ChatTemplated {
    public let model: Qwen2_5_VLForConditionalGeneration
    public let tokenizer: Tokenizer
    public let processor: Qwen25VLImageProcessor
    /// The checkpoint's template; each <|image_pad|> it emits is expanded to the image's tokens.
    public var chatTemplate: ChatTemplate
    public let stopIds: Set<Int>

    public var lm: CausalLM { model }
    public var module: Module { model }
    public var config: Qwen25VLConfig { model.config }
    public var parts: ModelParts {
        ModelParts(vision: model.visual.tower, projector: [model.visual.merger], language: model.languageModel)
    }
    /// The reference trains every Qwen2.5-VL weight.
    public var defaultTrainedParts: [ModelPart] { [.vision, .projector, .lm] }

    public init(model: Qwen2_5_VLForConditionalGeneration, tokenizer: Tokenizer, processor: Qwen25VLImageProcessor,
                stopIds: Set<Int>, chatTemplate: ChatTemplate = .qwen2VL) {
        self.model = model
        self.chatTemplate = chatTemplate
        self.tokenizer = tokenizer
        self.processor = processor
        self.stopIds = stopIds
    }

    /// An HF Qwen2.5-VL directory: config.json, model.safetensors or sharded + index,
    /// tokenizer.json, preprocessor_config.json (HF's defaults when absent).
    public static func load(_ dir: URL) throws -> Qwen25VL {
        let configURL = dir.appendingPathComponent("config.json")
        let data: Data
        do { data = try Data(contentsOf: configURL) } catch {
            throw ModelError("\(configURL.path): cannot read (\(error.localizedDescription))")
        }
        let config = try Qwen25VLConfig.decode(data, url: configURL)
        try config.text.checkFits(weightBytes: try LMLoader.weightBytes(dir), bitsPerParameter: 8, file: configURL.path)
        let model = try Qwen2_5_VLForConditionalGeneration(config)
        var state: [String: Tensor] = [:]
        for (k, v) in try LMLoader.readSafeTensorsDir(dir) { state[Qwen2_5_VLForConditionalGeneration.currentName(k)] = v }
        let report = try model.load(state, strict: false)
        let unexpected = report.unexpected.filter { !(config.tieWordEmbeddings && $0 == "lm_head.weight") && !$0.hasSuffix("inv_freq") }
        if !report.missing.isEmpty || !unexpected.isEmpty || !report.mismatched.isEmpty {
            var r = report
            r.unexpected = unexpected
            throw ModelError("\(dir.path): weights do not match the config: \(r)")
        }
        let tokenizer = try Tokenizer(tokenizerJSON: dir.appendingPathComponent("tokenizer.json"))
        let ppURL = dir.appendingPathComponent("preprocessor_config.json")
        var processor = Qwen25VLImageProcessor()
        if FileManager.default.fileExists(atPath: ppURL.path) {
            do { processor = try Qwen25VLImageProcessor(json: Data(contentsOf: ppURL)) } catch {
                throw ModelError("\(ppURL.path): \(error)")
            }
        }
        for (name, id) in [("<|image_pad|>", config.imageTokenId), ("<|vision_start|>", config.visionStartTokenId)]
        where tokenizer.id(of: name) != id {
            throw ModelError("\(dir.path): tokenizer id of \(name) is \(tokenizer.id(of: name).map(String.init) ?? "none"), config says \(id)")
        }
        return Qwen25VL(model: model, tokenizer: tokenizer, processor: processor,
                        stopIds: LMLoader.stopIds(tokenizer, eos: config.text.eosTokenId),
                        chatTemplate: try ChatTemplate.find(in: dir) ?? .fallback(.qwen2VL, for: dir.path))
    }

    /// The chat-formatted prompt: "<image>" in `text` marks where the image part goes (first when absent).
    public func render(text: String, image: Bool, system: String?) throws -> String {
        let messages = (system.map { [ChatMessage.system($0)] } ?? []) + [ChatMessage.user(parts: text, images: image ? 1 : 0)]
        return try chatTemplate.render(messages, addGenerationPrompt: true)
    }

    public func prepare(text: String, image: Image?, system: String?) throws -> PreparedPrompt {
        let ids = tokenizer.encode(try render(text: text, image: image != nil, system: system))
        return try prepare(ids: ids, images: image.map { [$0] } ?? [])
    }

    /// Token ids holding one <|image_pad|> per image → embeddings with the vision features
    /// spliced in, and HF's get_rope_index positions.
    public func prepare(ids: [Int], images: [Image]) throws -> PreparedPrompt {
        let processed = try images.map { try processor($0) }
        let unit = config.vision.spatialMergeSize * config.vision.spatialMergeSize
        var expanded: [Int] = [], imageNo = 0
        for id in ids {
            guard id == config.imageTokenId else { expanded.append(id); continue }
            guard imageNo < processed.count else { throw ModelError("prompt has more image slots than the \(images.count) image(s)") }
            let g = processed[imageNo].grid
            expanded += Array(repeating: id, count: g.t * g.h * g.w / unit)
            imageNo += 1
        }
        guard imageNo == processed.count else { throw ModelError("prompt has \(imageNo) image slot(s) for \(images.count) image(s)") }

        var embeds = try model.embed(Tensor(expanded.map { Int64($0) }, shape: [1, expanded.count]))
        if !processed.isEmpty {
            let features = try model.visual(Tensor.cat(processed.map(\.pixels), dim: 0), grids: processed.map(\.grid))
            // Row k of `features` goes to the k-th image token; text rows keep their embedding.
            var k = 0
            let source = expanded.map { id -> Int64 in
                guard id == config.imageTokenId else { return 0 }
                defer { k += 1 }
                return Int64(k)
            }
            let isImage = try Tensor(expanded.map { $0 == config.imageTokenId }, shape: [1, expanded.count, 1])
            let spliced = try features.indexSelect(dim: 0, index: Tensor(source)).unsqueeze(0)
            embeds = try Tensor.where(isImage, spliced.to(embeds.dtype), embeds)
        }
        let (positions, next) = Self.ropeIndex(expanded, imageToken: config.imageTokenId,
                                               grids: processed.map(\.grid), merge: config.vision.spatialMergeSize)
        return PreparedPrompt(embeddings: embeds,
                              positions: try Tensor(positions.flatMap { $0 }.map { Int64($0) }, shape: [3, 1, expanded.count]),
                              nextPosition: next, tokenIds: expanded.map { $0 == config.imageTokenId ? -1 : $0 })
    }

    /// HF's get_rope_index for images: text advances all three positions together; an image's
    /// merged tokens share one temporal position and take row/column offsets from where the
    /// image starts; text after it resumes past the larger side. Returns [3][T] and the next position.
    public static func ropeIndex(_ ids: [Int], imageToken: Int, grids: [(t: Int, h: Int, w: Int)], merge: Int) -> ([[Int]], Int) {
        var pos = [[Int]](repeating: [], count: 3)
        var cur = 0, i = 0, imageNo = 0
        while i < ids.count {
            guard ids[i] == imageToken, imageNo < grids.count else {
                for s in 0..<3 { pos[s].append(cur) }
                cur += 1
                i += 1
                continue
            }
            let g = grids[imageNo], lh = g.h / merge, lw = g.w / merge
            for t in 0..<g.t {
                for y in 0..<lh {
                    for x in 0..<lw {
                        pos[0].append(cur + t)
                        pos[1].append(cur + y)
                        pos[2].append(cur + x)
                    }
                }
            }
            i += g.t * lh * lw
            cur += max(lh, lw)
            imageNo += 1
        }
        return (pos, (pos.flatMap { $0 }.max() ?? -1) + 1)
    }
}
