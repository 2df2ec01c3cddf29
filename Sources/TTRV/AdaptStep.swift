import Foundation
import Models
import Torch

/// One RL step in five stages, each a function below, with typed values between them:
/// collect rollouts → advantages → old and reference log-probs → update → step metrics.
extension Adapter {
    /// One prompt's rollout: its samples, their answers and votes.
    struct Rollout {
        var item: Item
        var prompt: PreparedPrompt
        /// All `votes` samples; the first `trainSamples` are trained on.
        var samples: [Completion]
        var vote: VoteResult
        /// Share of samples with no valid answer under strict parsing (in every mode, for monitoring).
        var strictInvalid: Double
        var trained: [[Int]]
    }

    /// The log-probs the loss compares against, per trained prompt: old (the sampling policy) and reference.
    struct Targets {
        var old: Tensor
        var reference: Tensor?
    }

    struct UpdateStats {
        var kl = 0.0, pgLoss = 0.0, clipFraction = 0.0, ratioMaxAbsLog = 0.0, gradNorm = 0.0
        var updates = 0, skipped = 0
        var trainSeconds = 0.0, optimizerSeconds = 0.0
    }

    /// One RL step on a batch of prompts; returns its log line.
    func step(_ batch: [Item], index: Int, epoch: Int, totalSteps: Int) throws -> StepLog {
        if reference == nil { reference = try copies(trainable.map(\.tensor)) }
        let t0 = Date()
        let rollouts = try collectRollouts(batch, step: index)
        let tRollout = Date().timeIntervalSince(t0)
        let advantages = advantagesOf(rollouts)
        // Groups whose advantages are all zero only carry the KL term; default mode skips them.
        let active = rollouts.indices.filter { options.mode == .reference || advantages[$0].contains { $0 != 0 } }
        let t1 = Date()
        let targets = try logprobTargets(rollouts, active)
        let tOldRef = Date().timeIntervalSince(t1)
        optimizer.lr = options.resolvedLR * schedule(totalSteps).factor(at: index)
        let stats = try update(rollouts, advantages, targets, active)
        return metrics(rollouts, stats, step: index, epoch: epoch, seconds: Date().timeIntervalSince(t0),
                       rollout: tRollout, oldRef: tOldRef)
    }

    func schedule(_ totalSteps: Int) -> LRSchedule {
        LRSchedule.cosine(warmup: Int(Double(totalSteps) * options.warmupRatio), total: totalSteps)
    }

    // MARK: 1. rollouts

    /// Every prompt prefilled once and fanned out to `votes` samples; all samples of the batch decode
    /// together; each sample's answer votes.
    func collectRollouts(_ batch: [Item], step: Int) throws -> [Rollout] {
        let prompts = try noGrad { try batch.map { try prepare($0) } }
        let sampling = SamplingParams(temperature: options.temperature, topP: options.topP, maxTokens: options.maxNewTokens,
                                      seed: options.seed &* 1_000_003 &+ UInt64(step))
        let completions = try generator.generateBatch(prompts, samples: options.votes, params: sampling)
        return batch.enumerated().map { i, item in
            let samples = Array(completions[(i * options.votes)..<((i + 1) * options.votes)])
            let answers = samples.map { answerOf($0, item: item, style: options.answerStyle) }
            let vote = voteRewards(answers: answers, entropyCoef: options.entropyCoef, kind: options.reward,
                                   denominator: .allVotes)
            let invalid = samples.filter { extractAnswer($0.text, mode: item.answerMode) == nil }.count
            return Rollout(item: item, prompt: prompts[i], samples: samples, vote: vote,
                           strictInvalid: Double(invalid) / Double(samples.count),
                           trained: samples.prefix(options.trainSamples).map(\.tokens))
        }
    }

    func prepare(_ item: Item) throws -> PreparedPrompt {
        try vlm.prepare(text: item.prompt, image: item.image?.load(), system: nil)
    }

    // MARK: 2. advantages

    /// The trained samples' rewards, normalised per prompt (reference) or over the batch (default).
    func advantagesOf(_ rollouts: [Rollout]) -> [[Double]] {
        let rewards = rollouts.map { Array($0.vote.rewards.prefix(options.trainSamples)) }
        return options.resolvedAdvantage == .group ? rewards.map { groupAdvantages($0) } : batchAdvantages(rewards)
    }

    // MARK: 3. log-probs

    /// log π(sampled tokens) of a rollout's trained samples under the current weights and grad mode.
    /// This is the one place that prepares a prompt again after the rollout: the rollout's prepared
    /// prompt was built without autograd, and the reference pass runs under other weights, so both
    /// the training forward and the reference need embeddings computed in their own setting.
    func policyLogprobs(_ r: Rollout) throws -> (logp: Tensor, mask: Tensor) {
        let padId = vlm.tokenizer.padId ?? vlm.stopIds.first ?? 0
        return try GRPO.sequenceLogprobs(lm: vlm.lm, prompt: prepare(r.item), responses: r.trained, padId: padId)
    }

    /// Old log-probs are the sampler's own at temperature 1 (same weights, same distribution); else
    /// recomputed. Reference log-probs come from the starting policy, swapped in for the pass.
    func logprobTargets(_ rollouts: [Rollout], _ active: [Int]) throws -> [Int: Targets] {
        var targets: [Int: Targets] = [:]
        try noGrad {
            for i in active {
                targets[i] = Targets(old: try options.temperature == 1 ? samplerLogprobs(rollouts[i])
                                         : policyLogprobs(rollouts[i]).logp)
            }
            guard options.klCoef > 0, !active.isEmpty else { return }
            try withWeights(reference!) {
                for i in active { targets[i]!.reference = try policyLogprobs(rollouts[i]).logp }
            }
        }
        return targets
    }

    func samplerLogprobs(_ r: Rollout) throws -> Tensor {
        let kept = r.samples.prefix(options.trainSamples).map(\.logprobs)
        let width = kept.map(\.count).max() ?? 0
        return try Tensor(kept.flatMap { $0 + [Float](repeating: 0, count: width - $0.count) }, shape: [kept.count, width])
    }

    // MARK: 4. update

    /// PPO-clip + KL, token-mean over each mini-batch of prompts, one optimiser update per mini-batch.
    func update(_ rollouts: [Rollout], _ advantages: [[Double]], _ targets: [Int: Targets],
                _ active: [Int]) throws -> UpdateStats {
        var stats = UpdateStats()
        var loss = PolicyLossConfig()
        loss.clip = options.clip
        loss.dualClip = options.dualClip
        loss.klCoef = options.klCoef
        let params = trainable.map(\.tensor)
        for start in stride(from: 0, to: active.count, by: options.resolvedMiniBatch) {
            let group = Array(active[start..<min(active.count, start + options.resolvedMiniBatch)])
            let tokens = group.reduce(0) { $0 + rollouts[$1].trained.reduce(0) { $0 + $1.count } }
            let ta = Date()
            for i in group {
                let t = targets[i]!
                try withGrad {
                    let (logp, mask) = try policyLogprobs(rollouts[i])
                    let adv = try Tensor(advantages[i].map { Float($0) })
                    let pg = try GRPO.policyLoss(logp: logp, oldLogp: t.old, advantages: adv, mask: mask, config: loss)
                    var total = pg.loss
                    if let ref = t.reference {
                        let kl = try GRPO.lowVarKL(logp: logp, refLogp: ref, mask: mask)
                        stats.kl += try kl.item()
                        total = try total + kl * options.klCoef
                    }
                    stats.pgLoss += try pg.loss.item()
                    stats.clipFraction += pg.clipFraction
                    stats.ratioMaxAbsLog = max(stats.ratioMaxAbsLog, pg.maxAbsLogRatio)
                    // Each prompt's token-mean loss, weighted by its share of the mini-batch's tokens, sums
                    // to the token-mean over the mini-batch.
                    let own = Double(rollouts[i].trained.reduce(0) { $0 + $1.count })
                    try (total * (own / Double(tokens))).backward()
                }
            }
            let tb = Date()
            stats.trainSeconds += tb.timeIntervalSince(ta)
            let norm = try clipGradNorm(params, maxNorm: options.gradClip)
            if norm.isFinite { try optimizer.step() } else { stats.skipped += 1 }
            try optimizer.zeroGrad()
            stats.gradNorm += norm.isFinite ? norm : 0
            stats.updates += 1
            stats.optimizerSeconds += Date().timeIntervalSince(tb)
        }
        let n = Double(max(1, active.count))
        stats.kl /= n
        stats.pgLoss /= n
        stats.clipFraction /= n
        stats.gradNorm /= Double(max(1, stats.updates))
        return stats
    }

    // MARK: 5. metrics

    func metrics(_ rollouts: [Rollout], _ u: UpdateStats, step: Int, epoch: Int, seconds: Double,
                 rollout: Double, oldRef: Double) -> StepLog {
        let rewards = rollouts.flatMap(\.vote.rewards)
        let mean = rewards.reduce(0, +) / Double(rewards.count)
        let std = (rewards.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(max(1, rewards.count - 1))).squareRoot()
        func average(_ f: (Rollout) -> Double) -> Double { rollouts.map(f).reduce(0, +) / Double(rollouts.count) }
        let labelled = rollouts.filter { $0.item.answer != nil }
        return StepLog(
            step: step, epoch: epoch, rewardMean: mean, rewardStd: std, majorityRatio: average(\.vote.majorityRatio),
            invalidShare: average(\.strictInvalid), answerEntropy: average(\.vote.normalizedEntropy),
            responseLength: average { Double($0.samples.reduce(0) { $0 + $1.tokens.count }) / Double($0.samples.count) },
            kl: u.kl, pgLoss: u.pgLoss, clipFraction: u.clipFraction, ratioMaxAbsLog: u.ratioMaxAbsLog,
            gradNorm: u.gradNorm, updates: u.updates, skippedUpdates: u.skipped, lr: optimizer.lr, seconds: seconds,
            rolloutSeconds: rollout, oldRefSeconds: oldRef, trainSeconds: u.trainSeconds,
            optimizerSeconds: u.optimizerSeconds,
            labelAccuracy: labelled.isEmpty ? nil
                : Double(labelled.filter { isCorrect($0.vote.majority, $0.item) }.count) / Double(labelled.count),
            majorities: rollouts.map(\.vote.majority))
    }

    // MARK: weights

    /// Fresh copies of `tensors` (or copied into `into`, reusing its storage).
    func copies(_ tensors: [Tensor], into existing: [Tensor]? = nil) throws -> [Tensor] {
        try noGrad {
            if let existing {
                for (d, s) in zip(existing, tensors) { try d.copy_(s) }
                return existing
            }
            return try tensors.map { t in let c = try Tensor.empty(t.shape, dtype: t.dtype); try c.copy_(t); return c }
        }
    }

    /// Puts `values` into the trained tensors.
    func restore(_ values: [Tensor]) throws {
        do { try noGrad { for (p, v) in zip(trainable, values) { try p.tensor.copy_(v) } } } catch {
            throw AdaptError.weightRestore("\(error)")
        }
    }

    /// Runs `body` with `values` in place of the trained tensors, then puts the live ones back; a failed
    /// restore is an error that stops the run (training on the wrong weights would go unnoticed).
    func withWeights<R>(_ values: [Tensor], _ body: () throws -> R) throws -> R {
        let live = try copies(trainable.map(\.tensor))
        try restore(values)
        let result = Result { try body() }
        try restore(live)
        return try result.get()
    }
}
