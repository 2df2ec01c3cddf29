import Foundation
import Models
import Torch

public struct AlignOptions: Codable, Sendable {
    public var steps = 300
    public var batchSize = 8
    public var lr = 1e-3
    public var weightDecay = 0.0
    public var warmup = 20
    public var evalEvery = 100
    public var evalLimit = 200
    public var seed: UInt64 = 0
    /// Projector-only first stage: image tokens regress onto the decoder's embedding of the
    /// item's class name. No decoder pass is needed, so it costs milliseconds per batch.
    public var prealignSteps = 0
    public var prealignBatch = 64
    /// Distinct training images used by the first stage (their features are cached).
    public var prealignPool = 3000
    /// Train the reply to be the option letter, or the option's text (which strict answer
    /// parsing accepts as that option). SmolLM2-135M did not learn the letter lookup within
    /// 200 steps (chance level), while naming what it sees needs no lookup.
    public var target: AlignTarget = .letter
    public init() {}
}

public enum AlignTarget: String, Codable, Sendable { case letter, optionText = "option-text" }

/// Supervised warm-start of a composed VLM: trains its own weights (projector, LoRA) with
/// cross-entropy on the answer tokens only, the prompt (image included) as context.
public enum Aligner {
    /// Mean negative log-likelihood of "<answer><|im_end|>" for a batch of labelled items, with
    /// prompts of different lengths right-padded into one forward pass.
    public static func loss(_ vlm: ComposedVLM, items: [Item], target kind: AlignTarget = .letter) throws -> Tensor {
        let tok = vlm.tokenizer
        let end = tok.id(of: "<|im_end|>") ?? vlm.stopIds.first ?? 0
        var seqs: [Tensor] = [], spans: [(start: Int, targets: [Int])] = []
        for item in items {
            guard let letter = item.answer else { throw DatasetError(message: "align: item \(item.id) has no answer") }
            var answer = letter
            if kind == .optionText, let options = item.options, let i = ["A", "B", "C", "D", "E", "F"].firstIndex(of: letter), i < options.count {
                answer = options[i]
            }
            let p = try vlm.prepare(text: item.prompt, image: item.image?.load(), system: nil)
            let target = tok.encode(answer) + [end]
            let inputs = try vlm.lm.embed(Tensor(target.dropLast().map { Int64($0) }, shape: [1, target.count - 1]))
            seqs.append(target.count > 1 ? try Tensor.cat([p.embeddings, inputs], dim: 1) : p.embeddings)
            spans.append((p.embeddings.size(1) - 1, target))
        }
        let maxLen = seqs.map { $0.size(1) }.max()!
        let d = vlm.lm.hiddenSize
        let padded = try seqs.map { s in
            s.size(1) == maxLen ? s : try Tensor.cat([s, Tensor.zeros([1, maxLen - s.size(1), d])], dim: 1)
        }
        // Right padding: real tokens never attend to the padding after them.
        let pos = try Tensor.arange(maxLen).unsqueeze(0).expand([items.count, maxLen])
        let hidden = try vlm.lm.forward(embeddings: Tensor.cat(padded, dim: 0), positions: pos, cache: nil, valid: nil)
        let rows = try spans.enumerated().map { i, s in
            try hidden.select(dim: 0, index: i).narrow(dim: 0, start: s.start, length: s.targets.count)
        }
        let logits = try vlm.lm.logits(Tensor.cat(rows, dim: 0))
        let targets = try Tensor(spans.flatMap(\.targets).map { Int64($0) })
        return try F.crossEntropy(logits, targets)
    }

    /// Stage 1 (LLaVA-style feature alignment, made cheap): each image token is pulled towards
    /// the mean input embedding of " <class name>", so the decoder first sees images as words it
    /// knows. Needs `label` (the class name) on the items.
    public static func prealign(_ vlm: ComposedVLM, train: Dataset, options: AlignOptions, log: (String) -> Void) throws {
        var rng = SplitMix64(seed: options.seed &+ 17)
        let pool = Array(train.items.filter { $0.label != nil }.shuffled(using: &rng).prefix(options.prealignPool))
        guard !pool.isEmpty else { throw DatasetError(message: "align: --prealign-steps needs labelled items") }
        var targets: [String: Tensor] = [:]
        try noGrad {
            for name in Set(pool.compactMap(\.label)) {
                let ids = vlm.tokenizer.encode(" " + name)
                targets[name] = try vlm.lm.embed(Tensor(ids.map { Int64($0) }, shape: [1, ids.count])).mean(dim: 1, keepDim: true)
            }
        }
        let params = vlm.projector.parameters
        for p in params { try p.requiresGrad(true) }
        let opt = try AdamW(params, lr: options.lr, weightDecay: 0)
        let progress = Progress("prealign", total: options.prealignSteps)
        for step in 0..<options.prealignSteps {
            let batch = (0..<options.prealignBatch).map { _ in pool[rng.below(pool.count)] }
            let loss = try withGrad {
                let y = try Tensor.cat(batch.map { try vlm.imageEmbeddings($0.image!.load()) }, dim: 0)
                let t = try Tensor.cat(batch.map { targets[$0.label!]! }, dim: 0)
                return try (y - t).square().mean()
            }
            try loss.backward()
            try opt.step()
            try opt.zeroGrad()
            progress.update(step + 1, String(format: "mse %.5f", try loss.item()))
        }
    }

    /// With several processes (`ttrv launch`) each step's batch is drawn alike everywhere and split: every
    /// process takes every worldSize-th item, gradients are averaged, and rank 0 alone writes the model.
    public static func run(_ vlm: ComposedVLM, train: Dataset, eval: Dataset, options: AlignOptions, out: URL,
                           distributed: Distributed = .single, log: (String) -> Void) throws -> EvalReport {
        guard options.batchSize % distributed.worldSize == 0 else {
            throw DatasetError(message: "align: --batch-size \(options.batchSize) does not split over \(distributed.worldSize) processes")
        }
        if options.prealignSteps > 0 { try prealign(vlm, train: train, options: options, log: log) }
        try vlm.module.freeze()
        for (_, t) in vlm.ownParameters { try t.requiresGrad(true) }
        let params = vlm.ownParameters.map(\.tensor)
        log("align: training \(params.reduce(0) { $0 + $1.count }) parameters (\(vlm.ownParameters.count) tensors) on \(train.name)")
        let opt = try AdamW(params, lr: options.lr, weightDecay: options.weightDecay)
        let schedule = LRSchedule.cosine(warmup: options.warmup, total: options.steps, minRatio: 0.1)
        var rng = SplitMix64(seed: options.seed)
        var order = Array(train.items.indices)
        order.shuffle(using: &rng)
        var cursor = 0
        var evalOptions = EvalOptions()
        evalOptions.limit = options.evalLimit
        let progress = Progress("align", total: options.steps)
        var recent: [Double] = []
        var report: EvalReport?
        for step in 0..<options.steps {
            var batch: [Item] = []
            for _ in 0..<options.batchSize {
                if cursor == order.count { order.shuffle(using: &rng); cursor = 0 }
                batch.append(train.items[order[cursor]])
                cursor += 1
            }
            opt.lr = options.lr * schedule.factor(at: step)
            let mine = batch.indices.filter { $0 % distributed.worldSize == distributed.rank }.map { batch[$0] }
            let l = try withGrad { try loss(vlm, items: mine, target: options.target) }
            try l.backward()
            if distributed.worldSize > 1 { try distributed.allreduceMean(params.map { try $0.ensureGrad() }) }
            let norm = try clipGradNorm(params, maxNorm: 1.0)
            if norm.isFinite { try opt.step() }
            try opt.zeroGrad()
            recent.append(try l.item())
            if recent.count > 20 { recent.removeFirst() }
            progress.update(step + 1, String(format: "loss %.4f lr %.1e", recent.reduce(0, +) / Double(recent.count), opt.lr))
            if (step + 1) % options.evalEvery == 0 || step + 1 == options.steps {
                let r = try Evaluator.run(vlm, dataset: eval, modelName: "align step \(step + 1)", options: evalOptions,
                                          progressLabel: "held-out", distributed: distributed)
                log(String(format: "align step %d: held-out accuracy %.3f (invalid %.3f) on %d items", step + 1, r.accuracy, r.invalidShare, r.items))
                if distributed.isMain {
                    try vlm.save(to: out, metadata: ["align_step": "\(step + 1)", "heldout_accuracy": String(format: "%.4f", r.accuracy)])
                }
                report = r
            }
        }
        return report!
    }
}
