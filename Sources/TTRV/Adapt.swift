import Foundation
import Models
import Torch

/// `reference`: the public implementation's behaviour exactly (its answer parser, every reply
/// votes, per-group advantages). `default`: strict answers (invalid replies get no vote and
/// the lowest reward), batch-normalised advantages so the entropy term acts, collapse guard.
public enum AdaptMode: String, Codable, Sendable { case reference, `default` }
public enum AdvantageNorm: String, Codable, Sendable { case group, batch }
public enum RewardChoice: String, Codable, Sendable { case frequency, majority }

public struct AdaptOptions: Codable, Sendable {
    public var mode: AdaptMode = .default
    public var adaptSamples = 20
    /// Adapt on the first item only, repeated `adaptSamples` times (the one-example experiment).
    public var oneExample = false
    public var epochs = 2
    public var batchPrompts = 4
    public var votes = 32
    public var trainSamples = 16
    /// nil: 5e-7 in reference mode (the reference's value for billion-parameter models), else
    /// 2e-5 for full fine-tuning and for LoRA (1e-4 on LoRA drifted the default VLM: KL 0.37 after
    /// 6 steps and −12 points on the demo).
    public var lr: Double?
    /// Adds LoRA adapters of this rank (trains them and the projector instead of everything).
    public var loraRank: Int?
    public var reward: RewardChoice = .frequency
    public var entropyCoef = 0.75
    /// nil: group in reference mode, batch in default mode.
    public var advantage: AdvantageNorm?
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

    public init() {}

    public var resolvedLR: Double { lr ?? (mode == .reference ? 5e-7 : 2e-5) }
    public var resolvedAdvantage: AdvantageNorm { advantage ?? (mode == .reference ? .group : .batch) }
    public var answerStyle: AnswerStyle { mode == .reference ? .reference : .strict }
}

/// One RL step's log line (adapt_log.jsonl).
public struct StepLog: Codable, Sendable {
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
    public var gradNorm: Double
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
        case kl, pgLoss = "pg_loss", clipFraction = "clip_fraction", gradNorm = "grad_norm", skippedUpdates = "skipped_updates", lr, seconds
        case rolloutSeconds = "rollout_s", oldRefSeconds = "old_ref_logprob_s", trainSeconds = "fwd_bwd_s", optimizerSeconds = "optimizer_s"
        case labelAccuracy = "label_accuracy", majorities
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
    public var options: AdaptOptions
    public var log: [StepLog]

    enum CodingKeys: String, CodingKey {
        case accuracyBefore = "accuracy_before", accuracyAfter = "accuracy_after", evalItems = "eval_items"
        case adaptItems = "adapt_items", steps, seconds, dataset, evalDataset = "eval_dataset", model, mode
        case stoppedEarly = "stopped_early", visionNorm = "vision_norm", options, log
    }
}

/// Saved after every step so an interrupted run resumes where it stopped.
struct AdaptState: Codable {
    var completedSteps: Int
    var lastGoodStep: Int?
    var stoppedEarly: String?
    var seconds: Double
    var optionsFingerprint: String
}

public final class Adapter {
    public let vlm: VisionLanguageModel
    public let options: AdaptOptions
    public let out: URL
    let trainable: [(name: String, tensor: Tensor)]
    let optimizer: AdamW
    let generator: TextGenerator
    var snapshot: [Tensor] = []
    let log: (String) -> Void

    public init(vlm: VisionLanguageModel, options: AdaptOptions, out: URL, log: @escaping (String) -> Void) throws {
        self.vlm = vlm
        self.options = options
        self.out = out
        self.log = log
        let m = vlm.module
        try m.freeze()
        if let r = options.loraRank {
            guard let llama = vlm.lm as? LlamaForCausalLM else { throw DatasetError(message: "--lora-rank: this model's decoder does not support LoRA") }
            if !llama.namedParameters().contains(where: { $0.name.contains("lora_") }) { try llama.addLoRA(rank: r, seed: options.seed) }
            try m.unfreeze(matching: ["*lora_*", "multi_modal_projector.*", "*mlp1.*"])
        } else {
            try m.unfreeze()
            // Vision towers stay frozen (as the reference does for InternVL); their features are cached.
            try m.freeze(matching: ["vision_tower.*", "*.visual.*", "visual.*", "vision_model.*", "*vision_tower*"])
        }
        trainable = m.trainableParameters
        guard !trainable.isEmpty else { throw DatasetError(message: "adapt: the model has no trainable parameters") }
        optimizer = try AdamW(trainable.map(\.tensor), lr: options.resolvedLR, betas: (0.9, 0.999), weightDecay: options.weightDecay)
        generator = TextGenerator(lm: vlm.lm, tokenizer: vlm.tokenizer, stopIds: vlm.stopIds)
        if options.klCoef > 0 {
            snapshot = try noGrad { try trainable.map { p in let c = try Tensor.empty(p.tensor.shape); try c.copy_(p.tensor); return c } }
        }
    }

    public var trainableCount: Int { trainable.reduce(0) { $0 + $1.tensor.count } }

    /// Runs `body` with the starting weights in place of the current ones (the KL reference).
    func withReferenceWeights<R>(_ body: () throws -> R) throws -> R {
        let current = try noGrad { try trainable.map { p in let c = try Tensor.empty(p.tensor.shape); try c.copy_(p.tensor); return c } }
        try noGrad { for (p, s) in zip(trainable, snapshot) { try p.tensor.copy_(s) } }
        defer { try? noGrad { for (p, c) in zip(trainable, current) { try p.tensor.copy_(c) } } }
        return try body()
    }

    /// The adaptation prompts in step order: epochs × floor(n/batch) batches.
    public static func schedule(items: [Item], options: AdaptOptions) -> [[Item]] {
        let pool = options.oneExample ? Array(repeating: items[0], count: options.adaptSamples) : Array(items.prefix(options.adaptSamples))
        let perEpoch = pool.count / options.batchPrompts
        var steps: [[Item]] = []
        for _ in 0..<options.epochs {
            for s in 0..<perEpoch { steps.append(Array(pool[(s * options.batchPrompts)..<((s + 1) * options.batchPrompts)])) }
        }
        return steps
    }

    struct Rollout {
        var item: Item
        var prompt: PreparedPrompt
        var responses: [[Int]]
        /// The sampler's log-probs of the kept responses (the policy's own at temperature 1).
        var sampledLogp: [[Float]]
        var advantages: [Double]
        var vote: VoteResult
        var strictInvalid: Double
        var meanLength: Double
        var oldLogp: Tensor?
        var refLogp: Tensor?
    }

    /// One RL step on a batch of prompts; returns its log line.
    func step(_ batch: [Item], index: Int, epoch: Int, totalSteps: Int) throws -> (StepLog, CollapseGuard.StepStats) {
        let t0 = Date()
        let padId = vlm.tokenizer.padId ?? vlm.stopIds.first ?? 0
        // 1. rollout: every prompt prefilled once, fanned out to `votes` samples; all samples of
        // the batch decode together.
        let prompts = try noGrad { try batch.map { try vlm.prepare(text: $0.prompt, image: $0.image?.load(), system: nil) } }
        let sampling = SamplingParams(temperature: options.temperature, topP: options.topP, maxTokens: options.maxNewTokens,
                                      seed: options.seed &* 1_000_003 &+ UInt64(index))
        let completions = try generator.generateBatch(prompts, samples: options.votes, params: sampling)
        var rollouts: [Rollout] = []
        for (i, item) in batch.enumerated() {
            let prompt = prompts[i]
            let samples = Array(completions[(i * options.votes)..<((i + 1) * options.votes)])
            let answers = samples.map { answerOf($0, item: item, style: options.answerStyle) }
            let vote = voteRewards(answers: answers, entropyCoef: options.entropyCoef,
                                   kind: options.reward == .majority ? .majority : .frequency, denominator: .allVotes)
            let strictInvalid = Double(samples.filter { extractAnswer($0.text, mode: item.answerMode) == nil }.count) / Double(samples.count)
            let kept = Array(samples.prefix(options.trainSamples))
            rollouts.append(Rollout(item: item, prompt: prompt, responses: kept.map(\.tokens), sampledLogp: kept.map(\.logprobs),
                                    advantages: Array(vote.rewards.prefix(options.trainSamples)), vote: vote, strictInvalid: strictInvalid,
                                    meanLength: Double(samples.map(\.tokens.count).reduce(0, +)) / Double(samples.count)))
        }
        let tRollout = Date().timeIntervalSince(t0)
        // 2. advantages
        let rewards = rollouts.map(\.advantages)
        let adv = options.resolvedAdvantage == .group ? rewards.map { groupAdvantages($0) } : batchAdvantages(rewards)
        for i in rollouts.indices { rollouts[i].advantages = adv[i] }
        // Groups with all-zero advantage only carry the KL term; in default mode they are skipped.
        let active = rollouts.indices.filter { options.mode == .reference || rollouts[$0].advantages.contains { $0 != 0 } }
        // 3. old and reference log-probs, computed once before the updates.
        let t1 = Date()
        try noGrad {
            for i in active {
                if options.temperature == 1 {
                    // Same weights, same distribution: the rollout already computed these (the
                    // reference recomputes them because its sampler is a separate engine).
                    let r = rollouts[i].responses.map(\.count).max()!
                    let rows = rollouts[i].sampledLogp.map { $0 + Array(repeating: 0, count: r - $0.count) }
                    rollouts[i].oldLogp = try Tensor(rows.flatMap { $0 }, shape: [rows.count, r])
                } else {
                    rollouts[i].oldLogp = try GRPO.sequenceLogprobs(lm: vlm.lm, prompt: rollouts[i].prompt, responses: rollouts[i].responses, padId: padId).0
                }
            }
            if options.klCoef > 0, !active.isEmpty {
                try withReferenceWeights {
                    for i in active {
                        let image = try rollouts[i].item.image?.load()
                        let refPrompt = try vlm.prepare(text: rollouts[i].item.prompt, image: image, system: nil)
                        rollouts[i].refLogp = try GRPO.sequenceLogprobs(lm: vlm.lm, prompt: refPrompt, responses: rollouts[i].responses, padId: padId).0
                    }
                }
            }
        }
        let tOldRef = Date().timeIntervalSince(t1)
        // 4. one update per prompt (mini-batch = one prompt's trained samples), lr from the schedule.
        let warmup = Int(Double(totalSteps) * options.warmupRatio)
        optimizer.lr = options.resolvedLR * LRSchedule.cosine(warmup: warmup, total: totalSteps).factor(at: index)
        var lossCfg = PolicyLossConfig()
        lossCfg.clip = options.clip
        lossCfg.dualClip = options.dualClip
        lossCfg.klCoef = options.klCoef
        var tTrain = 0.0, tOpt = 0.0, klSum = 0.0, pgSum = 0.0, clipSum = 0.0, normSum = 0.0, skipped = 0
        let params = trainable.map(\.tensor)
        for i in active {
            let ta = Date()
            try withGrad {
                let image = try rollouts[i].item.image?.load()
                let prompt = try vlm.prepare(text: rollouts[i].item.prompt, image: image, system: nil)
                let (logp, mask) = try GRPO.sequenceLogprobs(lm: vlm.lm, prompt: prompt, responses: rollouts[i].responses, padId: padId)
                let a = try Tensor(rollouts[i].advantages.map { Float($0) })
                let (pg, clipFrac) = try GRPO.policyLoss(logp: logp, oldLogp: rollouts[i].oldLogp!, advantages: a, mask: mask, config: lossCfg)
                var loss = pg
                if let ref = rollouts[i].refLogp {
                    let kl = try GRPO.lowVarKL(logp: logp, refLogp: ref, mask: mask)
                    klSum += try kl.item()
                    loss = try loss + kl * options.klCoef
                }
                pgSum += try pg.item()
                clipSum += clipFrac
                try loss.backward()
            }
            let tb = Date()
            tTrain += tb.timeIntervalSince(ta)
            let norm = try clipGradNorm(params, maxNorm: options.gradClip)
            if norm.isFinite { try optimizer.step() } else { skipped += 1 }
            try optimizer.zeroGrad()
            normSum += norm.isFinite ? norm : 0
            tOpt += Date().timeIntervalSince(tb)
        }
        let n = Double(max(1, active.count))
        let allRewards = rollouts.flatMap { $0.vote.rewards }
        let mean = allRewards.reduce(0, +) / Double(allRewards.count)
        let std = (allRewards.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(max(1, allRewards.count - 1))).squareRoot()
        let labelled = rollouts.filter { $0.item.answer != nil }
        let stepLog = StepLog(
            step: index, epoch: epoch, rewardMean: mean, rewardStd: std,
            majorityRatio: rollouts.map(\.vote.majorityRatio).reduce(0, +) / Double(rollouts.count),
            invalidShare: rollouts.map(\.strictInvalid).reduce(0, +) / Double(rollouts.count),
            answerEntropy: rollouts.map(\.vote.normalizedEntropy).reduce(0, +) / Double(rollouts.count),
            responseLength: rollouts.map(\.meanLength).reduce(0, +) / Double(rollouts.count),
            kl: klSum / n, pgLoss: pgSum / n, clipFraction: clipSum / n, gradNorm: normSum / n, skippedUpdates: skipped,
            lr: optimizer.lr, seconds: Date().timeIntervalSince(t0), rolloutSeconds: tRollout, oldRefSeconds: tOldRef,
            trainSeconds: tTrain, optimizerSeconds: tOpt,
            labelAccuracy: labelled.isEmpty ? nil : Double(labelled.filter { isCorrect($0.vote.majority, $0.item) }.count) / Double(labelled.count),
            majorities: rollouts.map(\.vote.majority))
        // The guard only runs in default mode, where votes are already strictly parsed.
        let stats = CollapseGuard.StepStats(step: index, votes: rollouts.map(\.vote), meanResponseLength: stepLog.responseLength)
        return (stepLog, stats)
    }

    // MARK: files

    var checkpointURL: URL { out.appendingPathComponent("checkpoint") }

    func saveCheckpoint(_ state: AdaptState) throws {
        try FileManager.default.createDirectory(at: checkpointURL, withIntermediateDirectories: true)
        try saveSafeTensors(Dictionary(uniqueKeysWithValues: trainable.map { ($0.name, $0.tensor) }), to: checkpointURL.appendingPathComponent("weights.safetensors"))
        try saveSafeTensors(optimizer.state(), to: checkpointURL.appendingPathComponent("optimizer.safetensors"))
        if state.lastGoodStep == state.completedSteps - 1 {
            try? FileManager.default.removeItem(at: checkpointURL.appendingPathComponent("last_good.safetensors"))
            try FileManager.default.copyItem(at: checkpointURL.appendingPathComponent("weights.safetensors"), to: checkpointURL.appendingPathComponent("last_good.safetensors"))
        }
        // Written last: the state file is what makes the checkpoint count.
        try writeJSON(state, to: checkpointURL.appendingPathComponent("state.json"))
    }

    func loadWeights(_ url: URL) throws {
        let file = try SafeTensorsFile(url: url)
        try noGrad {
            for (name, t) in trainable {
                guard file.entries[name] != nil else { throw DatasetError(message: "\(url.path): no tensor \(name); was the run started with other options?") }
                try t.copy_(file.tensor(name))
            }
        }
    }

    func resume(fingerprint: String) throws -> AdaptState? {
        let stateURL = checkpointURL.appendingPathComponent("state.json")
        guard let data = try? Data(contentsOf: stateURL) else { return nil }
        let state = try JSONDecoder().decode(AdaptState.self, from: data)
        guard state.optionsFingerprint == fingerprint else {
            throw DatasetError(message: "\(out.path) holds a run with other options; use another --out or delete it")
        }
        try loadWeights(checkpointURL.appendingPathComponent("weights.safetensors"))
        try optimizer.loadState(SafeTensorsFile(url: checkpointURL.appendingPathComponent("optimizer.safetensors")).tensors())
        return state
    }

    /// Evaluate before, adapt, evaluate after, write everything under `out`.
    public func run(adaptData: Dataset, evalData: Dataset, modelName: String) throws -> AdaptReport {
        let composed = vlm as? ComposedVLM
        var visionNormTarget: ComposedVLM?
        if options.visionNorm ?? (options.mode == .default && composed?.hasVisionSource == true) {
            guard let composed else { throw DatasetError(message: "--vision-norm needs a composed VLM (its vision encoder has batch norms)") }
            visionNormTarget = composed
        }
        try FileManager.default.createDirectory(at: out, withIntermediateDirectories: true)
        var evalOptions = EvalOptions()
        evalOptions.limit = options.evalLimit
        evalOptions.batchSize = options.evalBatch
        evalOptions.maxTokens = options.maxNewTokens
        evalOptions.answerMode = options.answerStyle
        let fingerprint = String(describing: options) + adaptData.name + modelName
        let beforeURL = out.appendingPathComponent("eval_before.json")
        let before: EvalReport
        let evalCount = min(options.evalLimit ?? Int.max, evalData.items.count)
        if let data = try? Data(contentsOf: beforeURL), let r = try? JSONDecoder().decode(EvalReport.self, from: data),
           r.dataset == evalData.name, r.items == evalCount {
            before = r
            log("eval before: reusing \(beforeURL.path) (accuracy \(String(format: "%.4f", r.accuracy)))")
        } else {
            before = try Evaluator.run(vlm, dataset: evalData, modelName: modelName, options: evalOptions, progressLabel: "eval before")
            try writeJSON(before, to: beforeURL)
        }
        let steps = Adapter.schedule(items: adaptData.items, options: options)
        if let composed = visionNormTarget {
            let items = options.oneExample ? Array(adaptData.items.prefix(1)) : Array(adaptData.items.prefix(options.adaptSamples))
            let corrections = try composed.matchVisionSource(items.compactMap { try $0.image?.load() })
            try saveSafeTensors(corrections, metadata: ["ttrv": "vision batch-norm input corrections"], to: out.appendingPathComponent("vision_correction.safetensors"))
            log("vision norm: matched \(corrections.count / 2) batch-norm layers to the source statistics on \(items.count) unlabelled images")
        }
        guard !steps.isEmpty else { throw DatasetError(message: "adapt: \(options.adaptSamples) items make no batch of \(options.batchPrompts)") }
        var state = try resume(fingerprint: fingerprint) ?? AdaptState(completedSteps: 0, lastGoodStep: nil, stoppedEarly: nil, seconds: 0, optionsFingerprint: fingerprint)
        let logURL = out.appendingPathComponent("adapt_log.jsonl")
        var logs = (try? String(contentsOf: logURL, encoding: .utf8))?.split(separator: "\n").compactMap {
            try? JSONDecoder().decode(StepLog.self, from: Data($0.utf8))
        }.filter { $0.step < state.completedSteps } ?? []
        if state.completedSteps > 0 { log("resuming after step \(state.completedSteps) of \(steps.count)") }
        var guardian = CollapseGuard()
        for l in logs { _ = guardian.observe(CollapseGuard.StepStats(step: l.step, majorityRatio: l.majorityRatio, invalidShare: l.invalidShare, meanResponseLength: l.responseLength, answerEntropy: l.answerEntropy, majorities: [])) }
        let progress = Progress("adapt", total: steps.count)
        let perEpoch = max(1, steps.count / options.epochs)
        while state.completedSteps < steps.count, state.stoppedEarly == nil {
            let i = state.completedSteps
            let (entry, stats) = try step(steps[i], index: i, epoch: i / perEpoch, totalSteps: steps.count)
            logs.append(entry)
            let line = String(data: try JSONEncoder().encode(entry), encoding: .utf8)! + "\n"
            try (logs.dropLast().map { String(data: try JSONEncoder().encode($0), encoding: .utf8)! + "\n" }.joined() + line)
                .write(to: logURL, atomically: true, encoding: .utf8)
            state.completedSteps += 1
            state.seconds += entry.seconds
            if options.mode == .default, guardian.observe(stats) {
                state.stoppedEarly = "\(guardian.stopReason!)"
                log("collapse guard: \(state.stoppedEarly!); restoring the weights of step \(guardian.lastGoodStep.map(String.init) ?? "0 (start)")")
            } else {
                state.lastGoodStep = i
            }
            try saveCheckpoint(state)
            progress.update(state.completedSteps, String(format: "reward %.3f maj %.2f invalid %.2f kl %.1e label-acc %@ %.1fs/step",
                                                        entry.rewardMean, entry.majorityRatio, entry.invalidShare, entry.kl,
                                                        entry.labelAccuracy.map { String(format: "%.2f", $0) } ?? "-", entry.seconds), force: true)
        }
        if state.stoppedEarly != nil {
            let good = checkpointURL.appendingPathComponent("last_good.safetensors")
            if FileManager.default.fileExists(atPath: good.path) { try loadWeights(good) } else {
                try noGrad { for (p, s) in zip(trainable, snapshot) { try p.tensor.copy_(s) } }
            }
        }
        try saveSafeTensors(Dictionary(uniqueKeysWithValues: trainable.map { ($0.name, $0.tensor) }),
                            metadata: ["ttrv": "adapted", "steps": "\(state.completedSteps)"], to: out.appendingPathComponent("adapted.safetensors"))
        let after = try Evaluator.run(vlm, dataset: evalData, modelName: modelName + " (adapted)", options: evalOptions, progressLabel: "eval after")
        try writeJSON(after, to: out.appendingPathComponent("eval_after.json"))
        let report = AdaptReport(accuracyBefore: before.accuracy, accuracyAfter: after.accuracy, evalItems: after.items,
                                 adaptItems: options.oneExample ? 1 : min(options.adaptSamples, adaptData.items.count),
                                 steps: state.completedSteps, seconds: state.seconds, dataset: adaptData.name, evalDataset: evalData.name,
                                 model: modelName, mode: options.mode, stoppedEarly: state.stoppedEarly, visionNorm: visionNormTarget != nil,
                                 options: options, log: logs)
        try writeJSON(report, to: out.appendingPathComponent("report.json"))
        try HTMLReport.write(report, before: before, after: after, to: out.appendingPathComponent("report.html"))
        return report
    }
}
