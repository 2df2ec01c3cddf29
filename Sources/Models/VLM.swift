import Foundation
import Torch

/// A prompt ready for the decoder: token embeddings with image features spliced in.
public struct PreparedPrompt {
    /// [1, T, hidden]
    public var embeddings: Tensor
    /// RoPE positions: [1, T] for 1-D RoPE, [3, 1, T] for multimodal RoPE (Qwen2.5-VL).
    public var positions: Tensor
    /// Position of the first generated token (T for 1-D RoPE; max(positions)+1 for M-RoPE).
    public var nextPosition: Int
    /// The prompt's token ids, −1 at every image-feature position: batched generation shares a common
    /// token prefix between prompts only up to the first image, whose features differ per prompt.
    public var tokenIds: [Int]

    public init(embeddings: Tensor, positions: Tensor, nextPosition: Int, tokenIds: [Int]) {
        self.embeddings = embeddings
        self.positions = positions
        self.nextPosition = nextPosition
        self.tokenIds = tokenIds
    }
}

/// The parts of a vision-language model that adaptation can train.
public enum ModelPart: String, CaseIterable, Codable, Sendable {
    /// The vision tower (without the projector).
    case vision
    /// Only the affine parameters of the vision tower's normalisation layers.
    case visionNorm = "vision-norm"
    /// The projector from vision features to decoder embeddings.
    case projector
    /// The language model; its LoRA adapters instead when it carries some.
    case lm
    /// Every parameter (full fine-tuning; with LoRA, the base weights and the adapters).
    case all
}

/// Where each part lives in a model's module tree.
public struct ModelParts {
    public var vision: [Module]
    public var projector: [Module]
    public var language: Module

    public init(vision: [Module], projector: [Module], language: Module) {
        self.vision = vision
        self.projector = projector
        self.language = language
    }
}

/// The projections LoRA adapts by default (attention and MLP, as is usual for LoRA fine-tuning).
public let defaultLoRATargets: Set<String> = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

/// What eval, adapt and generate need from a vision-language model.
public protocol VisionLanguageModel: AnyObject {
    /// The decoder (its `forward` accepts `PreparedPrompt.positions` and [B, T] decode positions).
    var lm: CausalLM { get }
    var tokenizer: Tokenizer { get }
    /// Token ids that end a reply.
    var stopIds: Set<Int> { get }
    /// The whole network, for parameter names, freezing, LoRA and checkpoints.
    var module: Module { get }
    /// The model's parts, as modules of `module`'s tree.
    var parts: ModelParts { get }
    /// What test-time adaptation trains unless told otherwise (the reference's choice for the family).
    var defaultTrainedParts: [ModelPart] { get }
    /// Builds the prompt for one user turn. `text` holds the image placeholder "<image>" where
    /// the image goes (prepended when absent and an image is given).
    func prepare(text: String, image: Image?, system: String?) throws -> PreparedPrompt
    /// Forgets cached image features (after something that changes them outside the weights).
    func clearImageCache()
    /// Encodes `images` as one batch into the image-feature cache, so that the `prepare` calls that
    /// follow find them (a batch of images costs far less than one image at a time). A no-op for
    /// models without a cache, and while the vision tower trains.
    func prefetchImageFeatures(_ images: [Image]) throws
}

extension VisionLanguageModel {
    public var hasLoRA: Bool { !parts.language.loraModules.isEmpty }

    /// Adds LoRA adapters to the language model's projections (a no-op where it has them already).
    public func addLoRA(rank: Int, alpha: Double? = nil, seed: UInt64) throws {
        guard !hasLoRA else { return }
        let added = try parts.language.addLoRA(rank: rank, alpha: alpha ?? Double(2 * rank), targets: defaultLoRATargets,
                                               generator: Generator(seed: seed))
        guard added > 0 else {
            throw ModelError("LoRA: the language model has no linear layer named \(defaultLoRATargets.sorted())")
        }
    }

    /// The modules whose parameters `part` stands for.
    public func modules(of part: ModelPart) -> [Module] {
        let p = parts
        switch part {
        case .vision: return p.vision
        case .visionNorm: return p.vision.flatMap(\.normLayers)
        case .projector: return p.projector
        case .lm: return hasLoRA ? p.language.loraModules : [p.language]
        case .all: return [module]
        }
    }

    /// The named parameters (names as in `module`) of the given parts, in `module`'s order.
    public func parameters(of selected: [ModelPart]) -> [(name: String, tensor: Tensor)] {
        let wanted = Set(selected.flatMap { modules(of: $0) }.flatMap(\.parameters).map(ObjectIdentifier.init))
        let all = module.namedParameters()
        // With LoRA the language model's base weights never train, even when a norm or the
        // embedding of the language model is named by another part.
        let base = hasLoRA && !selected.contains(.all) ? Set(parts.language.parameters.map(ObjectIdentifier.init))
            .subtracting(parts.language.loraModules.flatMap(\.parameters).map(ObjectIdentifier.init)) : []
        return all.filter { wanted.contains(ObjectIdentifier($0.tensor)) && !base.contains(ObjectIdentifier($0.tensor)) }
    }

    public func clearImageCache() {}
    public func prefetchImageFeatures(_ images: [Image]) throws {}
}

/// Features of recently seen images from a frozen vision tower: adaptation prepares each image
/// several times per step (rollout, reference, training forward). Never used while any tower
/// parameter trains, since those features would go stale after every update.
public final class ImageFeatureCache: @unchecked Sendable {
    let capacity: Int
    private var entries: [ImageKey: Tensor] = [:]
    private var order: [ImageKey] = []
    private let lock = NSLock()

    public init(capacity: Int) { self.capacity = capacity }

    /// `compute`'s result for `image`, from the cache when `tower` is frozen. `compute` runs
    /// without autograd then (a frozen tower needs no graph).
    public func features(_ image: Image, tower: [Module], compute: () throws -> Tensor) throws -> Tensor {
        if Self.trains(tower) { return try compute() }
        let key = ImageKey(image)
        lock.lock()
        let hit = entries[key]
        lock.unlock()
        if let hit { return hit }
        let features = try noGrad { try compute() }
        store([(key, features)])
        return features
    }

    private static func trains(_ tower: [Module]) -> Bool {
        tower.contains { $0.parameters.contains(where: \.requiresGrad) }
    }

    /// Adds entries, evicting the oldest beyond the capacity.
    private func store(_ new: [(ImageKey, Tensor)]) {
        lock.lock()
        defer { lock.unlock() }
        for (key, f) in new where entries.updateValue(f, forKey: key) == nil { order.append(key) }
        while order.count > capacity { entries[order.removeFirst()] = nil }
    }

    /// Computes the features of the images not yet cached in one call of `compute` (which returns one
    /// tensor per image given), when `tower` is frozen.
    public func prefetch(_ images: [Image], tower: [Module], compute: ([Image]) throws -> [Tensor]) throws {
        if Self.trains(tower) { return }
        var missing: [(ImageKey, Image)] = []
        lock.lock()
        for image in images {
            let key = ImageKey(image)
            if entries[key] == nil, !missing.contains(where: { $0.0 == key }) { missing.append((key, image)) }
        }
        lock.unlock()
        guard !missing.isEmpty else { return }
        let features = try noGrad { try compute(missing.map(\.1)) }
        guard features.count == missing.count else {
            throw ModelError("image encoder returned \(features.count) feature sets for \(missing.count) images")
        }
        store(zip(missing, features).map { ($0.0, $1) })
    }

    public var count: Int {
        lock.lock()
        defer { lock.unlock() }
        return entries.count
    }

    public func removeAll() {
        lock.lock()
        entries.removeAll()
        order.removeAll()
        lock.unlock()
    }
}

/// Identity of an image's pixels, for the feature cache.
struct ImageKey: Hashable {
    let width: Int, height: Int, channels: Int, pixels: [UInt8]
    init(_ i: Image) {
        width = i.width
        height = i.height
        channels = i.channels
        pixels = i.pixels
    }
}
