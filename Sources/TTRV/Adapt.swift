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
    /// Which parts train; nil: the model family's default (`VisionLanguageModel.defaultTrainedParts`), the projector
    /// alone with `oneExample` (see `Adapter.defaultParts`).
    public var train: [ModelPart]?
    public var reward: RewardKind = .frequency
    /// Votes divided by the answer's prior across the adaptation images to this power (see `AnswerPrior`);
    /// 0 = off (the reference's reward).
    public var answerBalance = 0.0
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
    /// Also sample this many replies per evaluation item (maj@N, pass@N before and after); 0 = greedy only.
    public var evalVotes = 0
    public var seed: UInt64 = 0
    /// Before the RL steps, map the vision encoder's batch-norm statistics on the adaptation
    /// images onto those of its training data (label-free). nil: on in default mode for models
    /// that have source statistics (the default VLM does), off in reference mode.
    public var visionNorm: Bool?
    /// Also evaluate between the vision batch-norm matching and the RL steps, so that the report
    /// separates the two contributions (costs one more evaluation pass).
    public var evalAfterNorm = false
    /// Save a checkpoint every N steps (the last step and a collapse-guard stop are always saved).
    /// nil: every step while a checkpoint is small (≤ 256 MB), else every 5 steps.
    public var checkpointEvery: Int?

    public init() {}

    enum CodingKeys: String, CodingKey {
        case mode, adaptSamples = "adapt_samples", oneExample = "one_example", epochs, batchPrompts = "batch_prompts"
        case votes, trainSamples = "train_samples", lr, loraRank = "lora_rank", train, reward, answerBalance = "answer_balance"
        case entropyCoef = "entropy_coef", advantage, miniBatchPrompts = "mini_batch_prompts"
        case maxNewTokens = "max_new_tokens", temperature, topP = "top_p", klCoef = "kl_coef", clip
        case dualClip = "dual_clip", weightDecay = "weight_decay", gradClip = "grad_clip", warmupRatio = "warmup_ratio"
        case evalLimit = "eval_limit", evalBatch = "eval_batch", evalVotes = "eval_votes", seed, visionNorm = "vision_norm"
        case evalAfterNorm = "eval_after_norm", checkpointEvery = "checkpoint_every"
    }

    /// Missing keys take their defaults, so options written by an older ttrv still load.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        func value<T: Decodable>(_ key: CodingKeys, _ fallback: T) throws -> T {
            try c.decodeIfPresent(T.self, forKey: key) ?? fallback
        }
        let d = AdaptOptions()
        mode = try value(.mode, d.mode)
        adaptSamples = try value(.adaptSamples, d.adaptSamples)
        oneExample = try value(.oneExample, d.oneExample)
        epochs = try value(.epochs, d.epochs)
        batchPrompts = try value(.batchPrompts, d.batchPrompts)
        votes = try value(.votes, d.votes)
        trainSamples = try value(.trainSamples, d.trainSamples)
        lr = try c.decodeIfPresent(Double.self, forKey: .lr)
        loraRank = try c.decodeIfPresent(Int.self, forKey: .loraRank)
        train = try c.decodeIfPresent([ModelPart].self, forKey: .train)
        reward = try value(.reward, d.reward)
        answerBalance = try value(.answerBalance, d.answerBalance)
        entropyCoef = try value(.entropyCoef, d.entropyCoef)
        advantage = try c.decodeIfPresent(AdvantageNorm.self, forKey: .advantage)
        miniBatchPrompts = try c.decodeIfPresent(Int.self, forKey: .miniBatchPrompts)
        maxNewTokens = try value(.maxNewTokens, d.maxNewTokens)
        temperature = try value(.temperature, d.temperature)
        topP = try value(.topP, d.topP)
        klCoef = try value(.klCoef, d.klCoef)
        clip = try value(.clip, d.clip)
        dualClip = try value(.dualClip, d.dualClip)
        weightDecay = try value(.weightDecay, d.weightDecay)
        gradClip = try value(.gradClip, d.gradClip)
        warmupRatio = try value(.warmupRatio, d.warmupRatio)
        evalLimit = try c.decodeIfPresent(Int.self, forKey: .evalLimit)
        evalBatch = try value(.evalBatch, d.evalBatch)
        evalVotes = try value(.evalVotes, d.evalVotes)
        seed = try value(.seed, d.seed)
        visionNorm = try c.decodeIfPresent(Bool.self, forKey: .visionNorm)
        evalAfterNorm = try value(.evalAfterNorm, d.evalAfterNorm)
        checkpointEvery = try c.decodeIfPresent(Int.self, forKey: .checkpointEvery)
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
    /// max |log π_train − log π_sampler| over trained tokens: how closely the training forward reproduces
    /// the sampler (≈1e-6 in fp32; bf16 rounds the two paths differently, hence old log-probs from the trainer).
    public var samplerMaxAbsLog: Double?
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
    /// Each prompt's item id and vote histogram (for the report's examples).
    public var itemIds: [String]?
    public var voteCounts: [[VoteCount]]?

    enum CodingKeys: String, CodingKey {
        case step, epoch, rewardMean = "reward_mean", rewardStd = "reward_std", majorityRatio = "majority_ratio"
        case invalidShare = "invalid_share", answerEntropy = "answer_entropy", responseLength = "response_length"
        case kl, pgLoss = "pg_loss", clipFraction = "clip_fraction", ratioMaxAbsLog = "ratio_max_abs_log"
        case samplerMaxAbsLog = "sampler_max_abs_log"
        case gradNorm = "grad_norm", updates, skippedUpdates = "skipped_updates", lr, seconds
        case rolloutSeconds = "rollout_s", oldRefSeconds = "old_ref_logprob_s", trainSeconds = "fwd_bwd_s"
        case optimizerSeconds = "optimizer_s", labelAccuracy = "label_accuracy", majorities
        case itemIds = "item_ids", voteCounts = "vote_counts"
    }

    /// What the collapse guard reads of a step: the log line is the one source of step metrics.
    var guardStats: CollapseGuard.StepStats {
        CollapseGuard.StepStats(step: step, majorityRatio: majorityRatio, invalidShare: invalidShare,
                                meanResponseLength: responseLength, answerEntropy: answerEntropy, majorities: majorities,
                                itemIds: itemIds, kl: kl)
    }
}

public struct AdaptReport: Codable, Sendable {
    public var accuracyBefore: Double
    public var accuracyAfter: Double
    /// After the vision batch-norm matching, before the RL steps (with `eval_after_norm`).
    public var accuracyAfterNorm: Double?
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
        case accuracyAfterNorm = "accuracy_after_norm"
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
    /// Which answers the policy gives across the adaptation images so far (the reward's answer-prior correction).
    var answerPrior = AnswerPrior()
    /// The command line that started the run, for the report.
    public var command: String?
    /// When the collapse guard stops a run (default mode).
    public var guardThresholds = CollapseGuard.Thresholds()
    /// The processes of a data-parallel run (`ttrv launch`); rank 0 alone writes files.
    public let distributed: Distributed

    public init(vlm: VisionLanguageModel, options: AdaptOptions, out: URL, distributed: Distributed = .single,
                log: @escaping (String) -> Void) throws {
        self.vlm = vlm
        self.options = options
        self.out = out
        self.distributed = distributed
        self.log = distributed.isMain ? log : { _ in }
        if let r = options.loraRank { try vlm.addLoRA(rank: r, seed: options.seed) }
        trainedParts = options.train ?? Adapter.defaultParts(vlm, oneExample: options.oneExample)
        try vlm.module.freeze()
        for part in trainedParts where vlm.parameters(of: [part]).isEmpty {
            throw AdaptError.nothingToTrain("--train \(part.rawValue): this model has no parameters there")
        }
        trainable = vlm.parameters(of: trainedParts)
        for p in trainable { try p.tensor.requiresGrad(true) }
        optimizer = try AdamW(trainable.map(\.tensor), lr: options.resolvedLR, betas: (0.9, 0.999),
                              weightDecay: options.weightDecay)
        generator = TextGenerator(lm: vlm.lm, tokenizer: vlm.tokenizer, stopIds: vlm.stopIds)
        guard options.batchPrompts % distributed.worldSize == 0 else {
            throw AdaptError.badOptions(
                "--batch-prompts \(options.batchPrompts) does not split over \(distributed.worldSize) processes")
        }
        try distributed.broadcast(trainable.map(\.tensor), from: 0)
    }

    /// The family's default parts; from one image (`--one-example`) the projector alone where the model has
    /// one: ten updates on one prompt teach a trained language model that prompt's answer text, which it then
    /// gives to other images, while every change to the projector has to pass through the image tokens.
    static func defaultParts(_ vlm: VisionLanguageModel, oneExample: Bool) -> [ModelPart] {
        oneExample && !vlm.parameters(of: [.projector]).isEmpty ? [.projector] : vlm.defaultTrainedParts
    }

    public var trainableCount: Int { trainable.reduce(0) { $0 + $1.tensor.count } }

    /// The adaptation prompts in step order: epochs × floor(n/batch) batches.
    public static func schedule(items: [Item], options: AdaptOptions) -> [[Item]] {
        let pool = options.oneExample ? Array(repeating: items[0], count: options.adaptSamples)
            : Array(items.prefix(options.adaptSamples))
        let perEpoch = pool.count / options.batchPrompts
        var steps: [[Item]] = []
        for _ in 0..<options.epochs {
            for s in 0..<perEpoch {
                steps.append(Array(pool[(s * options.batchPrompts)..<((s + 1) * options.batchPrompts)]))
            }
        }
        return steps
    }

    /// Evaluate before, match vision statistics (optional), adapt with resume, evaluate after. With several
    /// processes every one runs this on the same gathered step logs (so the guard decides alike everywhere);
    /// rank 0 alone reads the checkpoint and writes every file.
    public func run(adaptData: Dataset, evalData: Dataset, modelName: String) throws -> AdaptReport {
        let main = distributed.isMain
        let composed = try visionNormTarget()
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        let evalOptions = self.evalOptions
        let before = try evaluation("eval_before.json", "eval before", evalData, modelName: modelName,
                                    options: evalOptions)
        let steps = Adapter.schedule(items: adaptData.items, options: options)
        guard !steps.isEmpty else {
            throw AdaptError.badOptions(
                "\(adaptData.name): \(options.adaptSamples) items make no batch of \(options.batchPrompts)")
        }
        var afterNorm: EvalReport?
        if let composed {
            try matchVision(composed, adaptData)
            if options.evalAfterNorm {
                afterNorm = try evaluation("eval_after_norm.json", "eval after vision norm", evalData,
                                           modelName: modelName + " (vision norm)", options: evalOptions)
            }
        }
        reference = try copies(trainable.map(\.tensor))
        let fingerprint = try fingerprint(adaptData, modelName)
        let resumed: RunState? = main ? try resume(fingerprint: fingerprint) : nil
        var lastGood: [Tensor]? = nil
        if let resumed { lastGood = try restoredLastGood(resumed) }
        var run = try synchronised(resumed ?? RunState(completedSteps: 0, stoppedEarly: nil, seconds: 0,
                                                        fingerprint: fingerprint))
        var logs = try stepLogs(before: run.completedSteps)
        // The guard's whole state follows from the steps it has seen: replay them.
        var guardian = CollapseGuard(thresholds: guardThresholds)
        for l in logs where options.mode == .default { guardian.observe(l.guardStats) }
        try replayAnswerPrior(logs, adaptData)
        if run.completedSteps > 0 { log("resuming after step \(run.completedSteps) of \(steps.count)") }
        let progress = Progress("adapt", total: main ? steps.count : 0)
        let perEpoch = max(1, steps.count / options.epochs)
        while run.completedSteps < steps.count, run.stoppedEarly == nil {
            let i = run.completedSteps
            let entry = try step(steps[i], index: i, epoch: i / perEpoch, totalSteps: steps.count)
            logs.append(entry)
            if main { try writeLog(logs) }
            run.completedSteps += 1
            run.seconds += entry.seconds
            // Every process sees the same step log, so the guard decides alike everywhere.
            if options.mode == .default, guardian.observe(entry.guardStats) {
                run.stoppedEarly = "\(guardian.stopReason!)"
                log("collapse guard: \(run.stoppedEarly!); restoring the weights of step "
                    + (guardian.lastGoodStep.map(String.init) ?? "0 (start)"))
                try restore(guardian.lastGoodStep == nil ? reference! : lastGood ?? reference!)
                // Only rank 0 keeps the last good weights of a resumed run: everyone takes its copy.
                try distributed.broadcast(trainable.map(\.tensor), from: 0)
            } else if options.mode == .default, guardian.lastGoodStep == i {
                lastGood = try copies(trainable.map(\.tensor), into: lastGood)
            }
            if main, shouldCheckpoint(after: run, of: steps.count) {
                // A step with a warning sign is not one to fall back to: keep the last good weights too.
                let warned = options.mode == .default && run.stoppedEarly == nil && guardian.lastGoodStep != i
                try saveCheckpoint(run, lastGood: warned ? lastGood : nil)
            }
            if main { progress.update(run.completedSteps, entry.progressLine, force: true) }
        }
        if main { try saveAdapted(steps: run.completedSteps) }
        let after = try Evaluator.run(vlm, dataset: evalData, modelName: modelName + " (adapted)", options: evalOptions,
                                      progressLabel: "eval after", distributed: distributed)
        let report = AdaptReport(
            accuracyBefore: before.accuracy, accuracyAfter: after.accuracy, accuracyAfterNorm: afterNorm?.accuracy,
            evalItems: after.items,
            adaptItems: options.oneExample ? 1 : min(options.adaptSamples, adaptData.items.count),
            steps: run.completedSteps, seconds: run.seconds, dataset: adaptData.name, evalDataset: evalData.name,
            model: modelName, mode: options.mode, stoppedEarly: run.stoppedEarly, visionNorm: composed != nil,
            trainedParts: trainedParts, trainableParameters: trainableCount, command: command, options: options, log: logs)
        if main {
            try writeJSON(after, to: out.appendingPathComponent("eval_after.json"))
            try writeJSON(report, to: out.appendingPathComponent("report.json"))
            try HTMLReport.write(report, before: before, after: after, to: out.appendingPathComponent("report.html"))
        }
        return report
    }

    /// The logged steps before `count` (rank 0's file, sent to every process).
    func stepLogs(before count: Int) throws -> [StepLog] {
        let mine = try distributed.isMain ? readLog().filter { $0.step < count } : []
        guard distributed.worldSize > 1 else { return mine }
        let all = try distributed.allgather(bytes: Array(try JSONEncoder().encode(mine)))
        return try JSONDecoder().decode([StepLog].self, from: Data(all[0]))
    }

    /// Rank 0's run state, weights and optimiser state on every process (a resumed run may exist on rank 0's
    /// disk alone).
    func synchronised(_ run: RunState) throws -> RunState {
        guard distributed.worldSize > 1 else { return run }
        let flags = try Tensor([Double(run.completedSteps), run.stoppedEarly == nil ? 0 : 1, run.seconds])
        try distributed.broadcast([flags], from: 0)
        let optimizerState = optimizer.state().sorted { $0.key < $1.key }.map(\.value)
        try distributed.broadcast(trainable.map(\.tensor) + optimizerState, from: 0)
        let v = try flags.doubles()
        var synced = run
        synced.completedSteps = Int(v[0])
        synced.stoppedEarly = v[1] == 0 ? nil : run.stoppedEarly ?? "stopped (see rank 0's log)"
        synced.seconds = v[2]
        return synced
    }

    /// Evaluation settings shared by the before/after evaluations (and `eval --weights` on a run).
    public var evalOptions: EvalOptions {
        var o = EvalOptions()
        o.limit = options.evalLimit
        o.batchSize = options.evalBatch
        o.maxTokens = options.maxNewTokens
        o.answerMode = options.answerStyle
        o.votes = options.evalVotes
        return o
    }

    func visionNormTarget() throws -> ComposedVLM? {
        let composed = vlm as? ComposedVLM
        guard options.visionNorm ?? (options.mode == .default && composed?.hasVisionSource == true) else { return nil }
        guard let composed else {
            throw AdaptError.badOptions("--vision-norm needs a composed VLM (its vision encoder has batch norms)")
        }
        return composed
    }

    /// An evaluation before the RL steps (of the starting model, or after the vision matching), written to
    /// `file` and reused on resume when it covers the same data.
    func evaluation(_ file: String, _ label: String, _ data: Dataset, modelName: String,
                    options o: EvalOptions) throws -> EvalReport {
        let url = out.appendingPathComponent(file)
        let count = min(o.limit ?? Int.max, data.items.count)
        if FileManager.default.fileExists(atPath: url.path) {
            let r = try readJSON(EvalReport.self, from: url)
            if r.dataset == data.name, r.items == count {
                log("\(file): reusing \(url.path) (accuracy \(String(format: "%.4f", r.accuracy)))")
                return r
            }
        }
        let r = try Evaluator.run(vlm, dataset: data, modelName: modelName, options: o,
                                  progressLabel: label,
                                  distributed: distributed)
        if distributed.isMain { try writeJSON(r, to: url) }
        return r
    }

    /// Label-free input correction before the RL steps: the encoder's batch-norm statistics on the
    /// unlabelled adaptation images are mapped onto its training data's.
    func matchVision(_ composed: ComposedVLM, _ data: Dataset) throws {
        let items = Array(data.items.prefix(options.oneExample ? 1 : options.adaptSamples))
        let corrections = try composed.matchVisionSource(items.compactMap { try $0.image?.load() })
        guard distributed.isMain else { return }
        try saveSafeTensors(corrections, metadata: ["ttrv": "vision batch-norm input corrections"],
                            to: out.appendingPathComponent(AdaptedWeights.visionCorrectionFile))
        let domain = composed.matchedVisionSource.map { $0.isEmpty ? "" : " of \($0) (the nearest source)" } ?? ""
        log("vision norm: matched \(corrections.count / 2) batch-norm layers to the source statistics\(domain) on "
            + "\(items.count) unlabelled images")
    }

    func fingerprint(_ data: Dataset, _ modelName: String) throws -> String {
        var o = options
        (o.evalLimit, o.evalVotes) = (nil, 0) // evaluation settings do not change the adaptation
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
