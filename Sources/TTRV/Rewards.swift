import Foundation

/// What a vote earns before the entropy term.
public enum RewardKind: String, Codable, Sendable, Equatable {
    /// The reference: the share of votes that agree with this answer.
    case frequency
    /// TTRL-style: 1 for the majority answer, 0 otherwise.
    case majority
}

/// What the frequency of an answer is a share of.
public enum VoteDenominator: Sendable, Equatable {
    /// All responses, invalid ones included (the reference, where every response votes).
    /// A prompt where most responses are invalid then pays little even to its majority.
    case allVotes
    /// Valid responses only: the majority of a mostly-invalid prompt is paid as much as on a
    /// clean prompt.
    case validVotes
}

/// The votes of one prompt's responses and what each response earns.
public struct VoteResult: Sendable, Equatable {
    /// One per response; nil = invalid (cast no vote).
    public let answers: [String?]
    /// Votes per distinct valid answer.
    public let counts: [String: Int]
    /// Most common valid answer; ties go to the one that appeared first (Python's
    /// `Counter.most_common`). Nil when no response is valid.
    public let majority: String?
    /// count(majority) / all responses (invalid ones included), 0 for no responses.
    public let majorityRatio: Double
    /// Invalid responses / all responses, 0 for no responses.
    public let invalidShare: Double
    /// H = −Σ p ln p over the distinct valid answers, p = count / valid votes.
    public let entropy: Double
    /// H / ln(M) for M distinct valid answers; 0 when M ≤ 1.
    public let normalizedEntropy: Double
    /// One per response.
    public let rewards: [Double]
}

/// TTRV's self-consistency reward for one prompt:
/// `reward_i = share(answer_i) − entropyCoef · H / ln(M)`.
///
/// With answers from `.reference` extraction (never nil), `.frequency` and `.allVotes` this
/// is exactly the reference (`count / N − α·H/ln M`, every response voting).
///
/// Invalid responses (nil) cast no vote: they are left out of `counts`, the majority and the
/// entropy, and their share is 0, so they earn `0 − α·H/ln M` — the same entropy term as
/// everyone else. Paying them a flat 0 instead would make an invalid reply beat a valid
/// minority answer whenever the entropy term exceeds its share (e.g. 1/32 − 0.75), which
/// teaches the model to stop answering; with share 0 an invalid reply is always the worst
/// outcome of its prompt, in per-group and in batch normalisation alike.
///
/// `weights` (the answer-prior correction, see `AnswerPrior`) scales each answer's votes before shares and
/// the majority are taken; the weighted votes keep the valid votes' total, so without weights (or with equal
/// ones) nothing changes. The entropy term and `majorityRatio` stay those of the raw votes.
public func voteRewards(
    answers: [String?], entropyCoef: Double = 0.75, kind: RewardKind = .frequency,
    denominator: VoteDenominator, weights: [String: Double]? = nil
) -> VoteResult {
    var counts: [String: Int] = [:]
    var firstSeen: [String] = []
    for case let a? in answers {
        if counts[a] == nil { firstSeen.append(a) }
        counts[a, default: 0] += 1
    }
    let total = answers.count
    let valid = counts.values.reduce(0, +)

    var weighted = counts.mapValues(Double.init)
    if let weights {
        for a in firstSeen { weighted[a]! *= weights[a] ?? 1 }
        // In the order of first appearance: a dictionary's order changes from process to process, and a
        // resumed run must pay the same rewards to the last bit.
        let total = firstSeen.reduce(0) { $0 + weighted[$1]! }
        if total > 0 { weighted = weighted.mapValues { $0 * Double(valid) / total } }
    }
    var majority: String?
    for a in firstSeen where majority == nil || weighted[a]! > weighted[majority!]! {
        majority = a
    }

    var entropy = 0.0
    for a in firstSeen {
        let p = Double(counts[a]!) / Double(valid)
        entropy -= p * log(p)
    }
    let m = firstSeen.count
    let normalized = m > 1 ? entropy / log(Double(m)) : 0
    let penalty = entropyCoef * normalized

    let shareOf = Double(denominator == .allVotes ? total : valid)
    let rewards = answers.map { a -> Double in
        guard let a else { return -penalty }
        switch kind {
        case .frequency: return weighted[a]! / shareOf - penalty
        case .majority: return (a == majority ? 1 : 0) - penalty
        }
    }
    return VoteResult(
        answers: answers, counts: counts, majority: majority,
        majorityRatio: total == 0 ? 0 : Double(majority.map { counts[$0]! } ?? 0) / Double(total),
        invalidShare: total == 0 ? 0 : Double(total - valid) / Double(total),
        entropy: entropy, normalizedEntropy: normalized, rewards: rewards)
}

// MARK: - Answer prior

/// How often the policy gives each answer across the adaptation images, whatever the image: the label-free
/// correction for a policy that favours some answers under a shift (on noisy Fashion-MNIST the default VLM
/// answers "Shirt" three times as often as shirts occur, and its majority vote inherits that). Dividing an
/// answer's votes by its prior π, `weight = π^-power`, rewards what this image says beyond what every image
/// gets; as training evens the policy's answers out, π flattens and the correction fades by itself. It
/// assumes the test answers are roughly balanced (as SHOT's diversity term does), so `power` is an option.
///
/// π(c) is c's mean vote share over the images that offer c (every open-ended image offers every answer),
/// each image counted once with its latest votes, plus one pseudo-image that gives all its answers alike.
/// One image alone (`--one-example`) has no prior apart from its own votes, which the correction would
/// flatten: weights are only given from `minImages` distinct images on.
public struct AnswerPrior: Sendable {
    public static let minImages = 8
    private var latest: [String: (offered: [String]?, shares: [String: Double])] = [:]

    public init() {}

    public var images: Int { latest.count }

    /// One image's votes (answers as voted: letters for multiple choice), as processes exchange them.
    public struct Observation: Codable, Sendable, Equatable {
        public var item: String
        public var options: [String]?
        public var votes: [VoteCount]
        public init(item: Item, votes: [VoteCount]) {
            self.item = item.id
            options = item.options
            self.votes = votes
        }
    }

    /// An image's latest votes replace its earlier ones; an image with no valid vote leaves no record.
    public mutating func record(_ o: Observation) {
        let valid = o.votes.compactMap { v in v.answer.map { ($0, v.count) } }
        let total = Double(valid.reduce(0) { $0 + $1.1 })
        guard total > 0 else { return }
        var shares: [String: Double] = [:]
        for (a, n) in valid { shares[answerContent(a, options: o.options), default: 0] += Double(n) / total }
        latest[o.item] = (o.options, shares)
    }

    /// π for every answer, summed once over the images in a fixed order (so that every process, and a resumed
    /// run, get the same bits).
    public func table() -> Table {
        var t = Table(images: latest.count)
        for key in latest.keys.sorted() {
            let e = latest[key]!
            guard let offered = e.offered else {
                t.openImages += 1
                for (c, share) in e.shares { t.open[c, default: 0] += share }
                continue
            }
            for c in Set(offered) {
                t.offered[c, default: (0, 0)].sum += e.shares[c] ?? 0
                t.offered[c, default: (0, 0)].images += 1
            }
        }
        return t
    }

    public struct Table: Sendable {
        public let images: Int
        var offered: [String: (sum: Double, images: Double)] = [:]
        var open: [String: Double] = [:]
        var openImages = 0.0

        init(images: Int) { self.images = images }

        /// π of one answer content for an image with these options (nil: open-ended).
        public func prior(of content: String, options: [String]?) -> Double {
            guard let options else {
                return ((open[content] ?? 0) + 1 / Double(max(1, open.count))) / (openImages + 1)
            }
            let seen = offered[content] ?? (0, 0)
            return (seen.sum + 1 / Double(max(1, options.count))) / (seen.images + 1)
        }

        /// Vote weights for `item`'s answers (as voted), nil while too few images have voted or `power` is 0.
        public func weights(for item: Item, answers: [String?], power: Double) -> [String: Double]? {
            guard power > 0, images >= AnswerPrior.minImages else { return nil }
            var w: [String: Double] = [:]
            for case let a? in answers where w[a] == nil {
                w[a] = pow(prior(of: answerContent(a, options: item.options), options: item.options), -power)
            }
            return w
        }
    }
}

/// What an answer says: the option's text for a multiple-choice letter, else the answer itself.
func answerContent(_ answer: String, options: [String]?) -> String {
    guard let options, let i = optionLetters(count: options.count).firstIndex(of: answer) else {
        return answer
    }
    return options[i]
}

// MARK: - GRPO advantages

/// GRPO advantages of one prompt's group: (r − mean) / (std + eps) with the unbiased std
/// (torch's default, as in the reference). A group whose rewards are all equal, or that has
/// a single member, carries no preference and gets exact zeros (computing it would leave
/// rounding noise of order 1e-17 / 1e-6).
///
/// Anything constant within the group cancels, the reference's entropy term included.
public func groupAdvantages(_ rewards: [Double], eps: Double = 1e-6) -> [Double] {
    normalized(rewards, eps: eps)
}

/// Advantages normalised over every response of the batch of prompts at once, keeping the
/// groups' shape. Unlike `groupAdvantages`, a term that is constant within a group but differs
/// between groups (the entropy term) survives: responses to prompts the model disagrees with
/// itself on are pushed down relative to confidently answered ones.
public func batchAdvantages(_ groups: [[Double]], eps: Double = 1e-6) -> [[Double]] {
    let flat = normalized(groups.flatMap { $0 }, eps: eps)
    var start = 0
    return groups.map { g in
        defer { start += g.count }
        return Array(flat[start..<start + g.count])
    }
}

private func normalized(_ r: [Double], eps: Double) -> [Double] {
    guard r.count > 1, let first = r.first, r.contains(where: { $0 != first }) else {
        return Array(repeating: 0, count: r.count)
    }
    let n = Double(r.count)
    let mean = r.reduce(0, +) / n
    let std = (r.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / (n - 1)).squareRoot()
    return r.map { ($0 - mean) / (std + eps) }
}

// MARK: - Collapse guard

/// Early stop for the collapse the reference runs into on long runs: the majority answer
/// turns empty or into one constant letter. Conservative by design: the first step observed
/// is the baseline, and invalid-answer signs count only once they have risen over it —
/// base models that start out replying empty (much of TTRV's gain is repairing that) must
/// not be stopped at step 0.
public struct CollapseGuard: Sendable {
    /// What the collapse guard watches, one per training step.
    public struct StepStats: Sendable, Equatable {
        public var step: Int
        /// Mean over prompts of `VoteResult.majorityRatio`. For logs: the rules read unanimity
        /// from `answerEntropy`, which unlike this ratio ignores invalid replies.
        public var majorityRatio: Double
        /// Invalid responses / all responses of the step. In `.reference` answer mode nothing
        /// is nil, so measure it with strict extraction there (for the guard, not the reward).
        public var invalidShare: Double
        /// Mean generated tokens per response, the end token included (an empty reply is 1).
        public var meanResponseLength: Double
        /// Mean over prompts of `VoteResult.normalizedEntropy`.
        public var answerEntropy: Double
        /// Each prompt's majority answer, nil where a prompt has no valid answer.
        public var majorities: [String?]
        /// Each prompt's item id, when known (else every prompt counts as a distinct item).
        public var itemIds: [String]?
        /// KL to the starting policy per token, measured at the step's start (so it is that of the
        /// weights the previous step left).
        public var kl: Double

        public init(
            step: Int, majorityRatio: Double, invalidShare: Double, meanResponseLength: Double,
            answerEntropy: Double, majorities: [String?], itemIds: [String]? = nil, kl: Double = 0
        ) {
            self.step = step
            self.itemIds = itemIds
            self.majorityRatio = majorityRatio
            self.invalidShare = invalidShare
            self.meanResponseLength = meanResponseLength
            self.answerEntropy = answerEntropy
            self.majorities = majorities
            self.kl = kl
        }

        /// From the step's per-prompt votes.
        public init(step: Int, votes: [VoteResult], meanResponseLength: Double, kl: Double = 0) {
            let n = Double(max(votes.count, 1))
            let responses = votes.reduce(0) { $0 + $1.answers.count }
            let invalid = votes.reduce(0.0) { $0 + $1.invalidShare * Double($1.answers.count) }
            self.init(
                step: step,
                majorityRatio: votes.reduce(0) { $0 + $1.majorityRatio } / n,
                invalidShare: responses == 0 ? 0 : invalid / Double(responses),
                meanResponseLength: meanResponseLength,
                answerEntropy: votes.reduce(0) { $0 + $1.normalizedEntropy } / n,
                majorities: votes.map(\.majority), kl: kl)
        }
    }

    public struct Thresholds: Sendable, Equatable {
        /// Invalid share above this (and `rise` above the baseline) …
        public var invalidShare = 0.5
        /// … or more than this share of prompts with an invalid majority …
        public var invalidMajorityShare = 0.5
        /// … for this many consecutive steps.
        public var invalidPatience = 2
        /// How far above the baseline the invalid share (or invalid-majority share) must be.
        public var rise = 0.1
        /// Mean length at or below this (only the end token) with a risen invalid share stops
        /// at once.
        public var minResponseLength = 1.0
        /// Every prompt unanimous on the same answer for at least this many consecutive steps …
        public var constantPatience = 3
        /// … and over at least this many distinct items in the run (small batches need more steps).
        /// A healthy model with uniformly placed correct letters agrees on one letter over 8
        /// items by chance with probability 4^-(8-1) ≈ 6e-5; one item repeated (`--one-example`)
        /// agreeing with itself is no sign at all.
        public var constantMinPrompts = 8
        /// A KL to the starting policy above this (nats per token) stops at once: the policy has left
        /// the region where its own votes can be trusted. Healthy default runs stay below 0.015; a run at
        /// 15× the learning rate reached 1.3 while losing 16 points, with every other sign quiet.
        public var maxKL = 0.1
        public init() {}
    }

    public enum Reason: Sendable, Equatable {
        case invalidAnswers(share: Double)
        case invalidMajority(share: Double)
        case emptyResponses(meanLength: Double)
        case constantAnswer(String)
        case policyDrift(kl: Double)
    }

    public let thresholds: Thresholds
    private var baseline: StepStats?
    private var invalidRun = 0
    private var invalidMajorityRun = 0
    /// The current run of steps unanimous on one answer: the answer, steps and prompts.
    private var constantRun: (answer: String, steps: Int, items: Set<String>)?

    /// Why to stop; nil while training looks healthy. Once set, it stays set.
    public private(set) var stopReason: Reason?
    /// The last step with no warning sign at all: the checkpoint to keep after a stop.
    public private(set) var lastGoodStep: Int?
    public var shouldStop: Bool { stopReason != nil }

    public init(thresholds: Thresholds = Thresholds()) {
        self.thresholds = thresholds
    }

    /// Records a step; returns `shouldStop`. Steps after a stop are ignored.
    @discardableResult
    public mutating func observe(_ s: StepStats) -> Bool {
        // The verdict and the checkpoint to fall back to are final once a stop is called.
        guard stopReason == nil else { return true }
        let t = thresholds
        let base = baseline ?? s
        if baseline == nil { baseline = s }

        let invalidMajority = s.majorities.isEmpty
            ? 0 : Double(s.majorities.filter { $0 == nil }.count) / Double(s.majorities.count)
        let baseInvalidMajority = base.majorities.isEmpty
            ? 0 : Double(base.majorities.filter { $0 == nil }.count) / Double(base.majorities.count)
        let invalidRose = s.invalidShare > base.invalidShare + t.rise

        let invalidSign = s.invalidShare > t.invalidShare && invalidRose
        let invalidMajoritySign = invalidMajority > t.invalidMajorityShare
            && invalidMajority > baseInvalidMajority + t.rise
        let emptySign = s.meanResponseLength <= t.minResponseLength && invalidRose
        let constant = constantAnswer(s)
        let driftSign = s.kl > t.maxKL

        invalidRun = invalidSign ? invalidRun + 1 : 0
        invalidMajorityRun = invalidMajoritySign ? invalidMajorityRun + 1 : 0
        if let answer = constant {
            let (steps, items) = constantRun?.answer == answer
                ? (constantRun!.steps, constantRun!.items) : (0, [])
            let ids = s.itemIds ?? s.majorities.indices.map { "step \(s.step) prompt \($0)" }
            constantRun = (answer, steps + 1, items.union(ids))
        } else {
            constantRun = nil
        }

        if !(invalidSign || invalidMajoritySign || emptySign || constant != nil || driftSign) {
            lastGoodStep = s.step
        }
        if driftSign {
            // The drifted weights are those the previous, so far "good", step produced: only the start
            // is known to be good.
            stopReason = .policyDrift(kl: s.kl)
            lastGoodStep = nil
        } else if emptySign {
            stopReason = .emptyResponses(meanLength: s.meanResponseLength)
        } else if invalidRun >= t.invalidPatience {
            stopReason = .invalidAnswers(share: s.invalidShare)
        } else if invalidMajorityRun >= t.invalidPatience {
            stopReason = .invalidMajority(share: invalidMajority)
        } else if let run = constantRun, run.steps >= t.constantPatience,
                  run.items.count >= t.constantMinPrompts {
            stopReason = .constantAnswer(run.answer)
        }
        return shouldStop
    }

    /// The answer every prompt of the step agrees on unanimously (entropy 0: no dissent
    /// among valid votes), if there is one.
    private func constantAnswer(_ s: StepStats) -> String? {
        guard let first = s.majorities.first, let answer = first, s.answerEntropy <= 1e-12,
              s.majorities.allSatisfy({ $0 == answer }) else { return nil }
        return answer
    }
}
