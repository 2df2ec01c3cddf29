import Foundation
import Models
import Torch

/// `reference`: the public implementation's behaviour exactly (its answer parser, every reply
/// votes, per-group advantages, one update per prompt). `default`: strict answers (invalid replies
/// get no vote and the lowest reward), batch-normalised advantages so the entropy term acts, one
/// update per step (strictly on-policy), collapse guard.
public enum AdaptMode: String, Codable, Sendable { case reference, `default` }
public enum AdvantageNorm: String, Codable, Sendable { case group, batch }

public struct AdaptOptions: Codable, Sendable, Equatable {
    public var mode: AdaptMode = .default
    public var adaptSamples = 20
    /// Adapt on the first item only, repeated `adaptSamples` times (the one-example experiment).
    public var oneExample = false
    public var epochs = 2
    public var batchPrompts = 4
    public var votes = 32
    public var trainSamples = 16
    /// nil: 5e-7 in reference mode (the reference's value for billion-parameter models), else 2e-5.
    public var lr: Double?
    /// Adds LoRA adapters of this rank to the language model (where it has none), so `lm` trains them.
    public var loraRank: Int?
    /// Which parts train; nil: the model family's default (see `VisionLanguageModel.defaultTrainedParts`).
    public var train: [ModelPart]?
    public var reward: RewardKind = .frequency
    public var entropyCoef = 0.75
    /// nil: group in reference mode, batch in default mode.
    public var advantage: AdvantageNorm?
    /// Prompts per optimiser update. nil: 1 in reference mode (verl's mini-batch of one prompt, so later
    /// mini-batches of a step are off-policy), else the whole step (one update: every ratio is 1).
    public var miniBatchPrompts: Int?
    /// The peer's setting; every option text of the built-in datasets fits with its stop token.
    public var maxNewTokens = 8
    public var temperature = 1.0
    public var topP = 1.0
    public var klCoef = 0.001
    public var clip = 0.2
    public var dualClip = 3.0
    public var weightDecay = 0.01
    public var gradClip = 1.0
    public var warmupRatio = 0.03
    public var evalLimit: Int?
    public var evalBatch = 16
    public var seed: UInt64 = 0
    /// Before the RL steps, map the vision encoder's batch-norm statistics on the adaptation
    /// images onto those of its training data (label-free). nil: on in default mode for models
    /// that have source statistics (the default VLM does), off in reference mode.
    public var visionNorm: Bool?
    /// Save a checkpoint every N steps (the last step and a collapse-guard stop are always saved).
    /// nil: every step while a checkpoint is small (≤ 256 MB), else every 5 steps.
    public var checkpointEvery: Int?

    public init() {}

    enum CodingKeys: String, CodingKey {
        case mode, adaptSamples = "adapt_samples", oneExample = "one_example", epochs, batchPrompts = "batch_prompts"
        case votes, trainSamples = "train_samples", lr, loraRank = "lora_rank", train, reward
        case entropyCoef = "entropy_coef", advantage, miniBatchPrompts = "mini_batch_prompts"
        case maxNewTokens = "max_new_tokens", temperature, topP = "top_p", klCoef = "kl_coef", clip
        case dualClip = "dual_clip", weightDecay = "weight_decay", gradClip = "grad_clip", warmupRatio = "warmup_ratio"
        case evalLimit = "eval_limit", evalBatch = "eval_batch", seed, visionNorm = "vision_norm"
        case checkpointEvery = "checkpoint_every"
    }

    public var resolvedLR: Double { lr ?? (mode == .reference ? 5e-7 : 2e-5) }
    public var resolvedAdvantage: AdvantageNorm { advantage ?? (mode == .reference ? .group : .batch) }
    public var resolvedMiniBatch: Int { min(miniBatchPrompts ?? (mode == .reference ? 1 : batchPrompts), batchPrompts) }
    public var answerStyle: AnswerStyle { mode == .reference ? .reference : .strict }
}

/// One RL step's log line (adapt_log.jsonl).
public struct StepLog: Codable, Sendable, Equatable {
    public var step: Int
    public var epoch: Int
    public var rewardMean: Double
    public var rewardStd: Double
    public var majorityRatio: Double
    public var invalidShare: Double
    public var answerEntropy: Double
    public var responseLength: Double
    public var kl: Double
    public var pgLoss: Double
    public var clipFraction: Double
    /// max |log π(token) − log π_old(token)| over the step's trained tokens: 0 while strictly on-policy.
    public var ratioMaxAbsLog: Double
    public var gradNorm: Double
    public var updates: Int
    public var skippedUpdates: Int
    public var lr: Double
    public var seconds: Double
    public var rolloutSeconds: Double
    public var oldRefSeconds: Double
    public var trainSeconds: Double
    public var optimizerSeconds: Double
    /// Monitoring only (never used for training): share of prompts whose majority answer is right.
    public var labelAccuracy: Double?
    /// Each prompt's majority answer (nil where no reply was valid).
    public var majorities: [String?] = []

    enum CodingKeys: String, CodingKey {
        case step, epoch, rewardMean = "reward_mean", rewardStd = "reward_std", majorityRatio = "majority_ratio"
        case invalidShare = "invalid_share", answerEntropy = "answer_entropy", responseLength = "response_length"
        case kl, pgLoss = "pg_loss", clipFraction = "clip_fraction", ratioMaxAbsLog = "ratio_max_abs_log"
        case gradNorm = "grad_norm", updates, skippedUpdates = "skipped_updates", lr, seconds
        case rolloutSeconds = "rollout_s", oldRefSeconds = "old_ref_logprob_s", trainSeconds = "fwd_bwd_s"
        case optimizerSeconds = "optimizer_s", labelAccuracy = "label_accuracy", majorities
    }

    /// What the collapse guard reads of a step: the log line is the one source of step metrics.
    var guardStats: CollapseGuard.StepStats {
        CollapseGuard.StepStats(step: step, majorityRatio: majorityRatio, invalidShare: invalidShare,
                                meanResponseLength: responseLength, answerEntropy: answerEntropy, majorities: majorities)
    }
}

public struct AdaptReport: Codable, Sendable {
    public var accuracyBefore: Double
    public var accuracyAfter: Double
    public var evalItems: Int
    public var adaptItems: Int
    public var steps: Int
    public var seconds: Double
    public var dataset: String
    public var evalDataset: String
    public var model: String
    public var mode: AdaptMode
    public var stoppedEarly: String?
    /// Whether the vision encoder's batch-norm statistics were matched before the RL steps.
    public var visionNorm: Bool
    public var trainedParts: [ModelPart]
    public var trainableParameters: Int
    public var command: String?
    public var options: AdaptOptions
    public var log: [StepLog]

    enum CodingKeys: String, CodingKey {
        case accuracyBefore = "accuracy_before", accuracyAfter = "accuracy_after", evalItems = "eval_items"
        case adaptItems = "adapt_items", steps, seconds, dataset, evalDataset = "eval_dataset", model, mode
        case stoppedEarly = "stopped_early", visionNorm = "vision_norm", trainedParts = "trained_parts"
        case trainableParameters = "trainable_parameters", command, options, log
    }
}

/// Label-free test-time RL: evaluate, adapt, evaluate, with everything written under `out`.
/// The step itself is in AdaptStep.swift, checkpoints and resume in AdaptCheckpoint.swift.
public final class Adapter {
    public let vlm: VisionLanguageModel
    public let options: AdaptOptions
    public let out: URL
    public let trainedParts: [ModelPart]
    let trainable: [(name: String, tensor: Tensor)]
    let optimizer: AdamW
    let generator: TextGenerator
    let log: (String) -> Void
    /// The policy as the RL steps start (the KL reference), taken by `run` after any label-free input
    /// correction, or on the first step.
    var reference: [Tensor]?
    /// The command line that started the run, for the report.
    public var command: String?
    /// When the collapse guard stops a run (default mode).
    public var guardThresholds = CollapseGuard.Thresholds()

    public init(vlm: VisionLanguageModel, options: AdaptOptions, out: URL, log: @escaping (String) -> Void) throws {
        self.vlm = vlm
        self.options = options
        self.out = out
        self.log = log
        if let r = options.loraRank { try vlm.addLoRA(rank: r, seed: options.seed) }
        trainedParts = options.train ?? vlm.defaultTrainedParts
        try vlm.module.freeze()
        for part in trainedParts where vlm.parameters(of: [part]).isEmpty {
            throw AdaptError.nothingToTrain("--train \(part.rawValue): this model has no parameters there")
        }
        trainable = vlm.parameters(of: trainedParts)
        for p in trainable { try p.tensor.requiresGrad(true) }
        optimizer = try AdamW(trainable.map(\.tensor), lr: options.resolvedLR, betas: (0.9, 0.999),
                              weightDecay: options.weightDecay)
        generator = TextGenerator(lm: vlm.lm, tokenizer: vlm.tokenizer, stopIds: vlm.stopIds)
    }

    public var trainableCount: Int { trainable.reduce(0) { $0 + $1.tensor.count } }

    /// The adaptation prompts in step order: epochs × floor(n/batch) batches.
    public static func schedule(items: [Item], options: AdaptOptions) -> [[Item]] {
        let pool = options.oneExample ? Array(repeating: items[0], count: options.adaptSamples)
            : Array(items.prefix(options.adaptSamples))
        let perEpoch = pool.count / options.batchPrompts
        var steps: [[Item]] = []
        for _ in 0..<options.epochs {
            for s in 0..<perEpoch { steps.append(Array(pool[(s * options.batchPrompts)..<((s + 1) * options.batchPrompts)])) }
        }
        return steps
    }

    /// Evaluate before, match vision statistics (optional), adapt with resume, evaluate after.
    public func run(adaptData: Dataset, evalData: Dataset, modelName: String) throws -> AdaptReport {
        let composed = try visionNormTarget()
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        let evalOptions = self.evalOptions
        let before = try evalBefore(evalData, modelName: modelName, options: evalOptions)
        let steps = Adapter.schedule(items: adaptData.items, options: options)
        guard !steps.isEmpty else {
            throw AdaptError.badOptions("\(adaptData.name): \(options.adaptSamples) items make no batch of \(options.batchPrompts)")
        }
        if let composed { try matchVision(composed, adaptData) }
        reference = try copies(trainable.map(\.tensor))
        var run = try resume(fingerprint: fingerprint(adaptData, modelName))
            ?? RunState(completedSteps: 0, stoppedEarly: nil, seconds: 0, fingerprint: fingerprint(adaptData, modelName))
        var logs = try readLog().filter { $0.step < run.completedSteps }
        if run.completedSteps > 0 { log("resuming after step \(run.completedSteps) of \(steps.count)") }
        // The guard's whole state follows from the steps it has seen: replay them.
        var guardian = CollapseGuard(thresholds: guardThresholds)
        var lastGood: [Tensor]? = try restoredLastGood(run)
        for l in logs where options.mode == .default { guardian.observe(l.guardStats) }
        let progress = Progress("adapt", total: steps.count)
        let perEpoch = max(1, steps.count / options.epochs)
        while run.completedSteps < steps.count, run.stoppedEarly == nil {
            let i = run.completedSteps
            let entry = try step(steps[i], index: i, epoch: i / perEpoch, totalSteps: steps.count)
            logs.append(entry)
            try writeLog(logs)
            run.completedSteps += 1
            run.seconds += entry.seconds
            if options.mode == .default, guardian.observe(entry.guardStats) {
                run.stoppedEarly = "\(guardian.stopReason!)"
                log("collapse guard: \(run.stoppedEarly!); restoring the weights of step "
                    + (guardian.lastGoodStep.map(String.init) ?? "0 (start)"))
                try restore(lastGood ?? reference!)
            } else if options.mode == .default, guardian.lastGoodStep == i {
                lastGood = try copies(trainable.map(\.tensor), into: lastGood)
            }
            if shouldCheckpoint(after: run, of: steps.count) {
                // A step with a warning sign is not one to fall back to: keep the last good weights too.
                let warned = options.mode == .default && run.stoppedEarly == nil && guardian.lastGoodStep != i
                try saveCheckpoint(run, lastGood: warned ? lastGood : nil)
            }
            progress.update(run.completedSteps, entry.progressLine, force: true)
        }
        try saveAdapted(steps: run.completedSteps)
        let after = try Evaluator.run(vlm, dataset: evalData, modelName: modelName + " (adapted)", options: evalOptions,
                                      progressLabel: "eval after")
        try writeJSON(after, to: out.appendingPathComponent("eval_after.json"))
        let report = AdaptReport(
            accuracyBefore: before.accuracy, accuracyAfter: after.accuracy, evalItems: after.items,
            adaptItems: options.oneExample ? 1 : min(options.adaptSamples, adaptData.items.count),
            steps: run.completedSteps, seconds: run.seconds, dataset: adaptData.name, evalDataset: evalData.name,
            model: modelName, mode: options.mode, stoppedEarly: run.stoppedEarly, visionNorm: composed != nil,
            trainedParts: trainedParts, trainableParameters: trainableCount, command: command, options: options, log: logs)
        try writeJSON(report, to: out.appendingPathComponent("report.json"))
        try HTMLReport.write(report, before: before, after: after, to: out.appendingPathComponent("report.html"))
        return report
    }

    /// Evaluation settings shared by the before/after evaluations (and `eval --weights` on a run).
    public var evalOptions: EvalOptions {
        var o = EvalOptions()
        o.limit = options.evalLimit
        o.batchSize = options.evalBatch
        o.maxTokens = options.maxNewTokens
        o.answerMode = options.answerStyle
        return o
    }

    func visionNormTarget() throws -> ComposedVLM? {
        let composed = vlm as? ComposedVLM
        guard options.visionNorm ?? (options.mode == .default && composed?.hasVisionSource == true) else { return nil }
        guard let composed else { throw AdaptError.badOptions("--vision-norm needs a composed VLM (its vision encoder has batch norms)") }
        return composed
    }

    /// The starting model's evaluation, reused on resume when it covers the same data.
    func evalBefore(_ data: Dataset, modelName: String, options o: EvalOptions) throws -> EvalReport {
        let url = out.appendingPathComponent("eval_before.json")
        let count = min(o.limit ?? Int.max, data.items.count)
        if FileManager.default.fileExists(atPath: url.path) {
            let r = try readJSON(EvalReport.self, from: url)
            if r.dataset == data.name, r.items == count {
                log("eval before: reusing \(url.path) (accuracy \(String(format: "%.4f", r.accuracy)))")
                return r
            }
        }
        let r = try Evaluator.run(vlm, dataset: data, modelName: modelName, options: o, progressLabel: "eval before")
        try writeJSON(r, to: url)
        return r
    }

    /// Label-free input correction before the RL steps: the encoder's batch-norm statistics on the
    /// unlabelled adaptation images are mapped onto its training data's.
    func matchVision(_ composed: ComposedVLM, _ data: Dataset) throws {
        let items = Array(data.items.prefix(options.oneExample ? 1 : options.adaptSamples))
        let corrections = try composed.matchVisionSource(items.compactMap { try $0.image?.load() })
        try saveSafeTensors(corrections, metadata: ["ttrv": "vision batch-norm input corrections"],
                            to: out.appendingPathComponent(AdaptedWeights.visionCorrectionFile))
        log("vision norm: matched \(corrections.count / 2) batch-norm layers to the source statistics on "
            + "\(items.count) unlabelled images")
    }

    func fingerprint(_ data: Dataset, _ modelName: String) throws -> String {
        var o = options
        o.evalLimit = nil // evaluation size does not change the adaptation
        let enc = JSONEncoder()
        enc.outputFormatting = .sortedKeys
        return String(decoding: try enc.encode(o), as: UTF8.self) + " data=\(data.name) model=\(modelName)"
    }
}

/// Errors of the adaptation loop, each naming what is wrong.
public enum AdaptError: Error, CustomStringConvertible {
    case badOptions(String)
    case nothingToTrain(String)
    case checkpoint(URL, String)
    case weightRestore(String)

    public var description: String {
        switch self {
        case .badOptions(let m), .nothingToTrain(let m): return m
        case .checkpoint(let url, let m): return "\(url.path): \(m)"
        case .weightRestore(let m): return "restoring weights failed, stopping the run: \(m)"
        }
    }
}

extension StepLog {
    var progressLine: String {
        String(format: "reward %.3f maj %.2f invalid %.2f kl %.1e ratio %.1e label-acc %@ %.1fs/step", rewardMean,
               majorityRatio, invalidShare, kl, ratioMaxAbsLog, labelAccuracy.map { String(format: "%.2f", $0) } ?? "-",
               seconds)
    }
}
