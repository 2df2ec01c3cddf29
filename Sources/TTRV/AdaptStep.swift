import Foundation
import Models
import Torch

/// One RL step in five stages, each a function below, with typed values between them:
/// collect rollouts → advantages → old and reference log-probs → update → step metrics.
extension Adapter {
    /// One prompt's rollout: its samples, their answers and votes.
    struct Rollout {
        var item: Item
        /// Index of the prompt in its step's batch (across all processes).
        var position: Int
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
        /// nil: the training forward's own, detached (one update per step, see `logprobTargets`).
        var old: Tensor?
        var reference: Tensor?
        /// The sampler's log-probs, to report how far the training forward is from them.
        var sampler: Tensor
    }

    struct UpdateStats {
        var kl = 0.0, pgLoss = 0.0, clipFraction = 0.0, ratioMaxAbsLog = 0.0, samplerMaxAbsLog = 0.0, gradNorm = 0.0
        var updates = 0, skipped = 0
        var trainSeconds = 0.0, optimizerSeconds = 0.0
    }

    /// One RL step on a batch of prompts; returns its log line. With several processes each takes every
    /// worldSize-th prompt of the batch; advantages, gradients and metrics are combined across them.
    func step(_ batch: [Item], index: Int, epoch: Int, totalSteps: Int) throws -> StepLog {
        if reference == nil { reference = try copies(trainable.map(\.tensor)) }
        let t0 = Date()
        let positions = batch.indices.filter { $0 % distributed.worldSize == distributed.rank }
        let rollouts = try collectRollouts(positions.map { batch[$0] }, positions: positions, step: index)
        let tRollout = Date().timeIntervalSince(t0)
        let advantages = try advantagesOf(rollouts, batchSize: batch.count)
        // Groups whose advantages are all zero only carry the KL term; default mode skips them.
        let active = rollouts.indices.filter { options.mode == .reference || advantages[$0].contains { $0 != 0 } }
        let t1 = Date()
        let targets = try logprobTargets(rollouts, active)
        let tOldRef = Date().timeIntervalSince(t1)
        optimizer.lr = options.resolvedLR * schedule(totalSteps).factor(at: index)
        let stats = try update(rollouts, advantages, targets, active)
        return try metrics(rollouts, stats, step: index, epoch: epoch, seconds: Date().timeIntervalSince(t0),
                           rollout: tRollout, oldRef: tOldRef)
    }

    func schedule(_ totalSteps: Int) -> LRSchedule {
        LRSchedule.cosine(warmup: Int(Double(totalSteps) * options.warmupRatio), total: totalSteps)
    }

    // MARK: 1. rollouts

    /// Every prompt prefilled once and fanned out to `votes` samples; all samples of the batch decode
    /// together; each sample's answer votes. Each prompt samples from its own random stream, seeded by its
    /// position in the step, so a prompt's samples do not depend on which process or batch it runs in.
    func collectRollouts(_ batch: [Item], positions: [Int], step: Int) throws -> [Rollout] {
        let prompts = try noGrad { try batch.map { try prepare($0) } }
        let sampling = SamplingParams(temperature: options.temperature, topP: options.topP, maxTokens: options.maxNewTokens)
        let seeds = positions.map { options.seed &* 1_000_003 &+ UInt64(step) &* 10_007 &+ UInt64($0) }
        let completions = try generator.generateBatch(prompts, samples: options.votes, params: sampling, seeds: seeds)
        let samples = batch.indices.map { Array(completions[($0 * options.votes)..<(($0 + 1) * options.votes)]) }
        let answers = zip(batch, samples).map { item, s in s.map { answerOf($0, item: item, style: options.answerStyle) } }
        try recordVotes(zip(batch, answers).map { .init(item: $0, votes: VoteCount.histogram($1)) })
        let prior = answerPrior.table()
        return batch.enumerated().map { i, item in
            let samples = samples[i], answers = answers[i]
            let weights = prior.weights(for: item, answers: answers, power: options.answerBalance)
            let vote = voteRewards(answers: answers, entropyCoef: options.entropyCoef, kind: options.reward,
                                   denominator: .allVotes, weights: weights)
            let invalid = samples.filter { extractAnswer($0.text, mode: item.answerMode) == nil }.count
            return Rollout(item: item, position: positions[i], prompt: prompts[i], samples: samples, vote: vote,
                           strictInvalid: Double(invalid) / Double(samples.count),
                           trained: samples.prefix(options.trainSamples).map(\.tokens))
        }
    }

    /// The step's votes join the answer prior before any reward is paid, every process's in prompt order, so
    /// that all processes pay alike.
    func recordVotes(_ mine: [AnswerPrior.Observation]) throws {
        var all = mine
        if distributed.worldSize > 1 {
            let gathered = try distributed.allgather(bytes: Array(try JSONEncoder().encode(mine)))
            let perRank = try gathered.map { try JSONDecoder().decode([AnswerPrior.Observation].self, from: Data($0)) }
            // Rank r holds prompts r, r + worldSize, ...: as evaluation's batches, with batches of one prompt.
            all = try interleaveBatches(perRank, sizes: Array(repeating: 1, count: perRank.map(\.count).reduce(0, +)))
        }
        for o in all { answerPrior.record(o) }
    }

    /// A resumed run rebuilds the answer prior from the logged steps' votes.
    func replayAnswerPrior(_ logs: [StepLog], _ data: Dataset) throws {
        let items = Dictionary(data.items.map { ($0.id, $0) }, uniquingKeysWith: { first, _ in first })
        for l in logs {
            for (id, votes) in zip(l.itemIds ?? [], l.voteCounts ?? []) {
                guard let item = items[id] else {
                    throw AdaptError.checkpoint(logURL, "step \(l.step) votes on item \(id), which \(data.name) lacks")
                }
                answerPrior.record(.init(item: item, votes: votes))
            }
        }
    }

    func prepare(_ item: Item) throws -> PreparedPrompt {
        try vlm.prepare(text: item.prompt, image: item.image?.load(), system: nil)
    }

    // MARK: 2. advantages

    /// The trained samples' rewards, normalised per prompt (reference) or over the whole step's batch
    /// (default), which with several processes means over every process's prompts.
    func advantagesOf(_ rollouts: [Rollout], batchSize: Int) throws -> [[Double]] {
        let rewards = rollouts.map { Array($0.vote.rewards.prefix(options.trainSamples)) }
        if options.resolvedAdvantage == .group { return rewards.map { groupAdvantages($0) } }
        guard distributed.worldSize > 1 else { return batchAdvantages(rewards) }
        // Every process rebuilds the whole batch in prompt order and keeps its own groups' rows.
        let gathered = try distributed.allgather(rewards.flatMap { $0 })
        var groups = [[Double]](repeating: [], count: batchSize)
        for (rank, flat) in gathered.enumerated() {
            for (k, position) in stride(from: rank, to: batchSize, by: distributed.worldSize).enumerated() {
                groups[position] = Array(flat[(k * options.trainSamples)..<((k + 1) * options.trainSamples)])
            }
        }
        let all = batchAdvantages(groups)
        return rollouts.map { all[$0.position] }
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

    /// Old log-probs, so that the first update of a step is exactly on-policy. The batched decode and the
    /// training forward round differently (bf16 always; fp32 by up to ≈2e-5 in MKL's AVX2 kernels), so
    /// when a step makes one update old log-probs are the training forward's own detached output (ratio
    /// exactly 1). With several updates per step they are one pass before the first update: in fp32 at
    /// temperature 1 the sampler's own (same weights, same distribution), under bf16 an autograd-mode pass
    /// (the pass without autograd uses merged LoRA weights, which round differently again). Reference
    /// log-probs come from the starting policy, under bf16 also in autograd mode, so that the KL is exactly
    /// 0 while the weights are the starting ones.
    func logprobTargets(_ rollouts: [Rollout], _ active: [Int]) throws -> [Int: Targets] {
        var targets: [Int: Targets] = [:]
        let oneUpdate = options.resolvedMiniBatch >= active.count
        try noGrad {
            for i in active {
                let sampler = try samplerLogprobs(rollouts[i])
                let old: Tensor?
                if oneUpdate {
                    old = nil
                } else if Precision.current == .bf16 {
                    old = try withGrad { try policyLogprobs(rollouts[i]).logp.detach() }
                } else {
                    old = options.temperature == 1 ? sampler : try policyLogprobs(rollouts[i]).logp
                }
                targets[i] = Targets(old: old, sampler: sampler)
            }
            guard options.klCoef > 0, !active.isEmpty else { return }
            try withWeights(reference!) {
                for i in active {
                    targets[i]!.reference = Precision.current == .bf16
                        ? try withGrad { try policyLogprobs(rollouts[i]).logp.detach() }
                        : try policyLogprobs(rollouts[i]).logp
                }
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

    /// PPO-clip + KL, token-mean over each mini-batch of prompts, one optimiser update per mini-batch. With
    /// several processes a mini-batch spans them (each contributes its share of prompts), losses are scaled
    /// by the mini-batch's global token count and gradients summed before the clip and the update, so
    /// every process makes the same update.
    func update(_ rollouts: [Rollout], _ advantages: [[Double]], _ targets: [Int: Targets],
                _ active: [Int]) throws -> UpdateStats {
        var stats = UpdateStats()
        var loss = PolicyLossConfig()
        loss.clip = options.clip
        loss.dualClip = options.dualClip
        loss.klCoef = options.klCoef
        let params = trainable.map(\.tensor)
        let world = distributed.worldSize
        let perUpdate = max(1, (options.resolvedMiniBatch + world - 1) / world)
        let mostActive = Int(try distributed.allreduce([Double(active.count)], op: .max)[0])
        for start in stride(from: 0, to: mostActive, by: perUpdate) {
            let group = Array(active[min(start, active.count)..<min(active.count, start + perUpdate)])
            let own = group.reduce(0) { $0 + rollouts[$1].trained.reduce(0) { $0 + $1.count } }
            let tokens = try distributed.allreduce([Double(own)])[0]
            let ta = Date()
            for i in group {
                let t = targets[i]!
                try withGrad {
                    let (logp, mask) = try policyLogprobs(rollouts[i])
                    let adv = try Tensor(advantages[i].map { Float($0) })
                    let pg = try GRPO.policyLoss(logp: logp, oldLogp: t.old ?? logp.detach(), advantages: adv, mask: mask,
                                                 config: loss)
                    stats.samplerMaxAbsLog = max(stats.samplerMaxAbsLog, try noGrad {
                        try ((logp - t.sampler).abs() * mask).max().item()
                    })
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
                    let mine = Double(rollouts[i].trained.reduce(0) { $0 + $1.count })
                    try (total * (mine / tokens)).backward()
                }
            }
            let tb = Date()
            stats.trainSeconds += tb.timeIntervalSince(ta)
            if world > 1 { try distributed.allreduce(params.map { try $0.ensureGrad() }) }
            let norm = try clipGradNorm(params, maxNorm: options.gradClip)
            if norm.isFinite { try optimizer.step() } else { stats.skipped += 1 }
            try optimizer.zeroGrad()
            stats.gradNorm += norm.isFinite ? norm : 0
            stats.updates += 1
            stats.optimizerSeconds += Date().timeIntervalSince(tb)
        }
        // Means over every process's trained prompts; maxima over all of them.
        let sums = try distributed.allreduce([stats.kl, stats.pgLoss, stats.clipFraction, Double(active.count)])
        let maxima = try distributed.allreduce([stats.ratioMaxAbsLog, stats.samplerMaxAbsLog], op: .max)
        let n = max(1, sums[3])
        (stats.kl, stats.pgLoss, stats.clipFraction) = (sums[0] / n, sums[1] / n, sums[2] / n)
        (stats.ratioMaxAbsLog, stats.samplerMaxAbsLog) = (maxima[0], maxima[1])
        stats.gradNorm /= Double(max(1, stats.updates))
        return stats
    }

    // MARK: 5. metrics

    /// What the log needs of one prompt's rollout; gathered from every process in prompt order.
    struct PromptSummary: Codable {
        var position: Int
        var itemId: String
        var rewards: [Double]
        var majorityRatio, strictInvalid, entropy, meanLength: Double
        var majority: String?
        var majorityCorrect: Bool?
        var votes: [VoteCount]
    }

    func summaries(_ rollouts: [Rollout]) throws -> [PromptSummary] {
        let mine = rollouts.map { r in
            PromptSummary(position: r.position, itemId: r.item.id, rewards: r.vote.rewards,
                          majorityRatio: r.vote.majorityRatio, strictInvalid: r.strictInvalid,
                          entropy: r.vote.normalizedEntropy,
                          meanLength: Double(r.samples.reduce(0) { $0 + $1.tokens.count }) / Double(r.samples.count),
                          majority: r.vote.majority,
                          majorityCorrect: r.item.answer.map { _ in isCorrect(r.vote.majority, r.item) },
                          votes: VoteCount.histogram(r.vote.answers))
        }
        guard distributed.worldSize > 1 else { return mine }
        let gathered = try distributed.allgather(bytes: Array(try JSONEncoder().encode(mine)))
        return try gathered.flatMap { try JSONDecoder().decode([PromptSummary].self, from: Data($0)) }
            .sorted { $0.position < $1.position }
    }

    func metrics(_ rollouts: [Rollout], _ u: UpdateStats, step: Int, epoch: Int, seconds: Double,
                 rollout: Double, oldRef: Double) throws -> StepLog {
        let prompts = try summaries(rollouts)
        let rewards = prompts.flatMap(\.rewards)
        let mean = rewards.reduce(0, +) / Double(rewards.count)
        let std = (rewards.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(max(1, rewards.count - 1))).squareRoot()
        func average(_ f: (PromptSummary) -> Double) -> Double { prompts.map(f).reduce(0, +) / Double(prompts.count) }
        let labelled = prompts.compactMap(\.majorityCorrect)
        return StepLog(
            step: step, epoch: epoch, rewardMean: mean, rewardStd: std, majorityRatio: average(\.majorityRatio),
            invalidShare: average(\.strictInvalid), answerEntropy: average(\.entropy), responseLength: average(\.meanLength),
            kl: u.kl, pgLoss: u.pgLoss, clipFraction: u.clipFraction, ratioMaxAbsLog: u.ratioMaxAbsLog,
            samplerMaxAbsLog: u.samplerMaxAbsLog,
            gradNorm: u.gradNorm, updates: u.updates, skippedUpdates: u.skipped, lr: optimizer.lr, seconds: seconds,
            rolloutSeconds: rollout, oldRefSeconds: oldRef, trainSeconds: u.trainSeconds,
            optimizerSeconds: u.optimizerSeconds,
            labelAccuracy: labelled.isEmpty ? nil : Double(labelled.filter { $0 }.count) / Double(labelled.count),
            majorities: prompts.map(\.majority), itemIds: prompts.map(\.itemId), voteCounts: prompts.map(\.votes))
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

    func exchange(_ values: [Tensor]) throws {
        do { for (p, v) in zip(trainable, values) { try p.tensor.swap_(v) } } catch {
            throw AdaptError.weightRestore("\(error)")
        }
    }

    /// Puts `values` into the trained tensors.
    func restore(_ values: [Tensor]) throws {
        do { try noGrad { for (p, v) in zip(trainable, values) { try p.tensor.copy_(v) } } } catch {
            throw AdaptError.weightRestore("\(error)")
        }
    }

    /// Runs `body` with `values` in place of the trained tensors, then puts the live ones back. The storages
    /// are exchanged, not copied (full fine-tuning would otherwise copy the whole model twice per step); a
    /// failed exchange back is an error that stops the run (training on the wrong weights would go unnoticed).
    func withWeights<R>(_ values: [Tensor], _ body: () throws -> R) throws -> R {
        try exchange(values)
        let result = Result { try body() }
        try exchange(values)
        return try result.get()
    }
}
