import Foundation
import Torch

/// A frozen image encoder that turns an image into a short sequence of feature vectors.
public protocol ImageEncoder: AnyObject {
    var featureDim: Int { get }
    /// The encoder's weights, as the composed model registers them (`vision_tower.*`).
    var module: Module { get }
    /// [1, K, featureDim] for one image (with autograd when it is on and encoder weights train).
    func encode(_ image: Image) throws -> Tensor
    /// `encode` of each image, computed as one batch.
    func encode(batch images: [Image]) throws -> [Tensor]
    /// The encoder's batch-norm layers by name; none means test-time recalibration does not apply.
    var batchNorms: [(name: String, module: BatchNorm2d)] { get }
    /// One forward pass over `images` as a single batch with every batch norm in `mode`.
    func calibrate(_ images: [Image], mode: BatchNorm2d.Calibration) throws
}

/// The default VLM's configuration (`config.json` of a composed model directory).
public struct ComposedConfig: Codable, Sendable {
    public var modelType = "ttrv-composed"
    /// "efficientnet-lite0" (the installed package) or a path to a .pth file.
    public var vision = "efficientnet-lite0"
    /// Encoder input size in pixels (the feature map, and so the token count, follows from it).
    public var imageSize = 112
    /// TF-style centre crop margin (size/(size+margin) of the shorter side is kept); 0 keeps the
    /// whole image, which small, tightly framed images such as Fashion-MNIST need.
    public var cropPadding = 0
    /// "default-lm" (the installed SmolLM2 GGUF) or a path to a GGUF file / HF directory.
    public var languageModel = "default-lm"
    public var projectorHidden = 576
    /// LoRA on the decoder; nil when the decoder is not adapted.
    public var loraRank: Int?
    public var loraAlpha: Double?
    public var systemPrompt: String?

    enum CodingKeys: String, CodingKey {
        case modelType = "model_type", vision, imageSize = "image_size", cropPadding = "crop_padding", languageModel = "language_model"
        case projectorHidden = "projector_hidden", loraRank = "lora_rank", loraAlpha = "lora_alpha", systemPrompt = "system_prompt"
    }
    public init() {}

    /// Missing keys take their defaults, so a hand-written config.json may name only what differs.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let d = ComposedConfig()
        modelType = try c.decodeIfPresent(String.self, forKey: .modelType) ?? d.modelType
        vision = try c.decodeIfPresent(String.self, forKey: .vision) ?? d.vision
        imageSize = try c.decodeIfPresent(Int.self, forKey: .imageSize) ?? d.imageSize
        cropPadding = try c.decodeIfPresent(Int.self, forKey: .cropPadding) ?? d.cropPadding
        languageModel = try c.decodeIfPresent(String.self, forKey: .languageModel) ?? d.languageModel
        projectorHidden = try c.decodeIfPresent(Int.self, forKey: .projectorHidden) ?? d.projectorHidden
        loraRank = try c.decodeIfPresent(Int.self, forKey: .loraRank)
        loraAlpha = try c.decodeIfPresent(Double.self, forKey: .loraAlpha)
        systemPrompt = try c.decodeIfPresent(String.self, forKey: .systemPrompt)
    }
}

/// LLaVA-style two-layer MLP from image features to decoder embeddings.
public final class Projector: Module {
    public let linear_1: Linear, linear_2: Linear
    public init(inFeatures: Int, hidden: Int, outFeatures: Int, seed: UInt64) throws {
        let g = Generator(seed: seed)
        linear_1 = try Linear(inFeatures, hidden, generator: g)
        linear_2 = try Linear(hidden, outFeatures, generator: g)
        super.init()
        register("linear_1", linear_1)
        register("linear_2", linear_2)
    }
    public func callAsFunction(_ x: Tensor) throws -> Tensor { try linear_2(linear_1(x).gelu()) }
}

/// Vision encoder → projector → image embeddings spliced into the decoder's input at the
/// chat template's image placeholder. Only the projector (and LoRA adapters, if any) are
/// stored in the model directory; the pretrained parts are referenced by name.
public final class ComposedVLM: VisionLanguageModel, ChatTemplated {
    public let config: ComposedConfig
    /// The model directory's `chat_template.jinja`, else the decoder's own template. Images are
    /// "<image>" in the message text (LLaVA-1.5's convention), where the image embeddings go.
    public var chatTemplate: ChatTemplate
    public let encoder: ImageEncoder
    public let language: LanguageModel
    public let projector: Projector
    public let module: Module
    /// Encoder features per image (evaluation sees each image twice, adaptation several times a step).
    private let featureCache = ImageFeatureCache(capacity: 4096)
    /// The encoder's batch-norm input statistics per source domain, layer by layer (see `visionSourceFile`).
    private var visionSources: [(domain: String, stats: [(mean: Tensor, variance: Tensor)])] = []

    public var lm: CausalLM { language.model }
    public var tokenizer: Tokenizer { language.tokenizer }
    public var stopIds: Set<Int> { language.stopIds }

    public init(config: ComposedConfig, encoder: ImageEncoder, language: LanguageModel, seed: UInt64 = 0) throws {
        self.config = config
        self.encoder = encoder
        self.language = language
        chatTemplate = language.template
        projector = try Projector(inFeatures: encoder.featureDim, hidden: config.projectorHidden,
                                  outFeatures: language.model.hiddenSize, seed: seed)
        module = Module()
        module.register("vision_tower", encoder.module)
        module.register("language_model", language.model)
        module.register("multi_modal_projector", projector)
        try module.freeze(matching: ["vision_tower.*"])
        if let r = config.loraRank { try addLoRA(rank: r, alpha: config.loraAlpha, seed: seed) }
    }

    public var parts: ModelParts { ModelParts(vision: [encoder.module], projector: [projector], language: language.model) }
    /// The reference's choice for a small composed model: the adapters and the projector.
    public var defaultTrainedParts: [ModelPart] { [.projector, .lm] }

    /// The weights this model adds to its pretrained parts (saved in the model directory).
    public var ownParameters: [(name: String, tensor: Tensor)] {
        module.namedParameters().filter { $0.name.hasPrefix("multi_modal_projector.") || $0.name.contains(".lora_") }
    }

    public func imageEmbeddings(_ image: Image) throws -> Tensor {
        try projector(featureCache.features(image, tower: [encoder.module]) { try encoder.encode(image) })
    }

    public func prepare(text: String, image: Image?, system: String?) throws -> PreparedPrompt {
        let placeholder = Self.imagePlaceholder
        var content = text
        if image != nil, !content.contains(placeholder) { content = placeholder + "\n" + content }
        var messages: [ChatMessage] = []
        if let s = system ?? config.systemPrompt { messages.append(.system(s)) }
        messages.append(.user(content))
        let rendered = try chatTemplate.render(messages, addGenerationPrompt: true)
        let pieces = rendered.components(separatedBy: placeholder)
        guard image != nil || pieces.count == 1 else { throw ModelError("prompt has an image placeholder but no image was given") }
        guard image == nil || pieces.count > 1 else {
            throw ModelError("\(chatTemplate.origin): the rendered prompt has no \(placeholder) for the image")
        }
        guard pieces.count <= 2 else { throw ModelError("prompt has \(pieces.count - 1) image placeholders; one image per prompt is supported") }
        var parts: [Tensor] = [], ids: [Int] = []
        for (i, piece) in pieces.enumerated() {
            if i > 0, let image {
                let e = try imageEmbeddings(image)
                parts.append(e)
                ids += Array(repeating: -1, count: e.size(1))
            }
            let t = tokenizer.encode(piece)
            guard !t.isEmpty else { continue }
            parts.append(try lm.embed(Tensor(t.map { Int64($0) }, shape: [1, t.count])))
            ids += t
        }
        let emb = try parts.count == 1 ? parts[0] : Tensor.cat(parts, dim: 1)
        return PreparedPrompt(embeddings: emb, positions: try Tensor.arange(ids.count).unsqueeze(0), nextPosition: ids.count, tokenIds: ids)
    }

    // MARK: vision recalibration (label-free)

    /// File in a model directory with the vision encoder's batch-norm input statistics on the
    /// data the model was trained on (written by `ttrv calibrate`).
    public static let visionSourceFile = "vision_source_stats.safetensors"

    /// Measures the encoder's source statistics on each domain's images (clean, in-domain data): one
    /// unnamed domain, or several named ones (a model trained on several kinds of image).
    public func measureVisionSources(_ domains: [(name: String, images: [Image])]) throws {
        guard !encoder.batchNorms.isEmpty else { throw ModelError("vision encoder \(config.vision) has no batch norm to calibrate") }
        visionSources = try domains.map { domain in
            try encoder.calibrate(domain.images, mode: .measureSource)
            return (domains.count == 1 ? "" : domain.name, try encoder.batchNorms.map { try measuredSource($0) })
        }
    }

    private func measuredSource(_ bn: (name: String, module: BatchNorm2d)) throws -> (mean: Tensor, variance: Tensor) {
        guard let s = bn.module.source else { throw ModelError("no source statistics for \(bn.name); run `ttrv calibrate` first") }
        return s
    }

    /// The statistics as stored in `visionSourceFile`: "<layer>.mean"/"<layer>.variance" for one domain,
    /// "<domain>/<layer>.mean"… for several.
    public func visionSourceStats() throws -> [String: Tensor] {
        guard !visionSources.isEmpty else { throw ModelError("no source statistics; run `ttrv calibrate` first") }
        var out: [String: Tensor] = [:]
        for (domain, stats) in visionSources {
            let prefix = domain.isEmpty ? "" : domain + "/"
            for ((name, _), s) in zip(encoder.batchNorms, stats) {
                out[prefix + name + ".mean"] = s.mean
                out[prefix + name + ".variance"] = s.variance
            }
        }
        return out
    }

    func loadVisionSourceStats(_ url: URL) throws {
        let file = try SafeTensorsFile(url: url).tensors(as: .float32)
        let domains = Set(file.keys.map { key in key.lastIndex(of: "/").map { String(key[..<$0]) } ?? "" }).sorted()
        guard !domains.isEmpty else { throw ModelError("\(url.path): no statistics in the file") }
        visionSources = try domains.map { domain in
            let prefix = domain.isEmpty ? "" : domain + "/"
            return (domain, try encoder.batchNorms.map { name, bn in
                guard let m = file[prefix + name + ".mean"], let v = file[prefix + name + ".variance"] else {
                    throw ModelError("\(url.path): no statistics for \(prefix + name)")
                }
                guard m.shape == bn.weight.shape, v.shape == bn.weight.shape else {
                    throw ModelError("\(url.path): \(prefix + name) statistics have shape \(m.shape), expected \(bn.weight.shape)")
                }
                return (m, v)
            })
        }
    }

    public var hasVisionSource: Bool { !encoder.batchNorms.isEmpty && !visionSources.isEmpty }

    /// The source domain the last matching chose ("" for a model with one).
    public private(set) var matchedVisionSource: String?

    /// Maps the encoder's internal statistics on `images` (unlabelled test images) onto the source
    /// statistics, layer by layer, and drops cached features. Returns the corrections by name. With
    /// several source domains it matches to the one that needs the smallest correction, i.e. the domain
    /// the images are nearest to (a shifted garment photo is still nearer to garments than to shapes).
    @discardableResult
    public func matchVisionSource(_ images: [Image]) throws -> [String: Tensor] {
        guard hasVisionSource else {
            throw ModelError("model has no vision source statistics (\(Self.visionSourceFile)); `ttrv calibrate --model DIR --data SPEC` measures them on clean data")
        }
        var best: (domain: String, stats: [(mean: Tensor, variance: Tensor)], cost: Double)?
        for (domain, stats) in visionSources {
            try match(images, to: stats)
            let cost = visionSources.count == 1 ? 0 : try correctionSize()
            if best == nil || cost < best!.cost { best = (domain, stats, cost) }
        }
        // The corrections in effect are the last domain's; put the nearest one's back when it was another.
        if best!.domain != visionSources.last!.domain { try match(images, to: best!.stats) }
        matchedVisionSource = best!.domain
        clearImageCache()
        return visionCorrections()
    }

    private func match(_ images: [Image], to stats: [(mean: Tensor, variance: Tensor)]) throws {
        for ((_, bn), s) in zip(encoder.batchNorms, stats) { bn.source = s }
        try encoder.calibrate(images, mode: .matchSource)
    }

    /// How far the corrections in effect are from none, in the source's own units: per channel the squared
    /// log of the scale plus the squared mean shift over the source deviation, averaged over channels and
    /// summed over layers.
    private func correctionSize() throws -> Double {
        try encoder.batchNorms.reduce(0) { total, bn in
            guard let c = bn.module.correction, let s = bn.module.source else { return total }
            // The batch mean m satisfies scale·m + shift = source mean, so m − source mean = (μ(1 − scale) − shift)/scale.
            let meanShift = try (s.mean * (c.scale * -1 + 1) - c.shift) / c.scale / (s.variance + bn.module.eps).sqrt()
            return total + (try (c.scale.log().square() + meanShift.square()).mean().item())
        }
    }

    /// The corrections in effect, by batch-norm name (".scale"/".shift"); empty when none.
    public func visionCorrections() -> [String: Tensor] {
        var out: [String: Tensor] = [:]
        for (name, bn) in encoder.batchNorms {
            if let c = bn.correction { out[name + ".scale"] = c.scale; out[name + ".shift"] = c.shift }
        }
        return out
    }

    public func clearImageCache() { featureCache.removeAll() }

    public func prefetchImageFeatures(_ images: [Image]) throws {
        try featureCache.prefetch(images, tower: [encoder.module]) { try encoder.encode(batch: $0) }
    }

    /// Puts back corrections saved from `visionCorrections()` (e.g. by an adaptation run in `file`).
    public func setVisionCorrections(_ c: [String: Tensor], from file: URL) throws {
        for (name, bn) in encoder.batchNorms {
            guard let scale = c[name + ".scale"], let shift = c[name + ".shift"] else {
                throw ModelError("\(file.path): no correction for \(name)")
            }
            do { try bn.setCorrection(scale: scale, shift: shift) } catch { throw ModelError("\(file.path): \(error)") }
        }
        clearImageCache()
    }

    /// Stands for the image in the prompt text.
    public static let imagePlaceholder = "<image>"

    // MARK: files

    public static func load(_ dir: URL, root: URL = Paths.repoRoot) throws -> ComposedVLM {
        let configURL = dir.appendingPathComponent("config.json")
        let data: Data
        do { data = try Data(contentsOf: configURL) } catch {
            throw ModelError("\(configURL.path): cannot read (\(error.localizedDescription))")
        }
        let config = try ComposedConfig.decode(data, url: configURL)
        let vlm = try create(config, root: root)
        if var own = try ChatTemplate.find(in: dir) {
            own.specialTokens.merge(vlm.language.template.specialTokens) { mine, _ in mine }
            vlm.chatTemplate = own
        }
        let weights = dir.appendingPathComponent("model.safetensors")
        let state = try SafeTensorsFile(url: weights).tensors(as: .float32)
        let own = Dictionary(uniqueKeysWithValues: vlm.ownParameters.map { ($0.name, $0.tensor) })
        let missing = own.keys.filter { state[$0] == nil }.sorted()
        let unexpected = state.keys.filter { own[$0] == nil }.sorted()
        guard missing.isEmpty, unexpected.isEmpty else {
            throw ModelError("\(weights.path): missing \(missing.prefix(5)) unexpected \(unexpected.prefix(5))")
        }
        try noGrad {
            for (name, t) in own {
                guard state[name]!.shape == t.shape else { throw ModelError("\(weights.path): \(name) has shape \(state[name]!.shape), expected \(t.shape)") }
                try t.copy_(state[name]!)
            }
        }
        let stats = dir.appendingPathComponent(visionSourceFile)
        if FileManager.default.fileExists(atPath: stats.path) { try vlm.loadVisionSourceStats(stats) }
        return vlm
    }

    /// A fresh model (random projector) from a configuration.
    public static func create(_ config: ComposedConfig, root: URL = Paths.repoRoot, seed: UInt64 = 0) throws -> ComposedVLM {
        let lmURL = config.languageModel == "default-lm" ? LMLoader.defaultLMPath(repoRoot: root) : URL(fileURLWithPath: config.languageModel)
        let language = try LMLoader.load(lmURL)
        let encoder = try makeImageEncoder(config.vision, imageSize: config.imageSize, cropPadding: config.cropPadding, root: root)
        return try ComposedVLM(config: config, encoder: encoder, language: language, seed: seed)
    }

    /// Writes config.json, model.safetensors (projector + LoRA) and chat_template.jinja atomically.
    public func save(to dir: URL, metadata: [String: String] = [:]) throws {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let enc = JSONEncoder()
        enc.outputFormatting = [.prettyPrinted, .sortedKeys]
        try enc.encode(config).write(to: dir.appendingPathComponent("config.json"), options: .atomic)
        if let source = chatTemplate.jinjaSource {
            try Data(source.utf8).write(to: dir.appendingPathComponent("chat_template.jinja"), options: .atomic)
        }
        try saveSafeTensors(Dictionary(uniqueKeysWithValues: ownParameters.map { ($0.name, $0.tensor) }), metadata: metadata,
                            to: dir.appendingPathComponent("model.safetensors"))
    }
}

