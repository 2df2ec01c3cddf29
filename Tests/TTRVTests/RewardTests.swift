import XCTest
@testable import TTRV

final class RewardTests: XCTestCase {
    private func assertEqual(_ a: [Double], _ b: [Double], accuracy: Double = 1e-12,
                             file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, file: file, line: line)
        for (x, y) in zip(a, b) {
            XCTAssertEqual(x, y, accuracy: accuracy, "\(a) vs \(b)", file: file, line: line)
        }
    }

    // MARK: voteRewards

    func testReferenceFormulaByHand() {
        let r = voteRewards(answers: ["A", "A", "B", "<|IM_END|>"], denominator: .allVotes)
        // p = (2/4, 1/4, 1/4); H = −(.5 ln .5 + 2 · .25 ln .25) = .5 ln 2 + ln 2 = 1.5 ln 2
        XCTAssertEqual(r.entropy, 1.5 * log(2.0), accuracy: 1e-15)
        XCTAssertEqual(r.entropy, 1.0397207708399179, accuracy: 1e-15)
        // M = 3: H / ln 3 = 1.0397207708399179 / 1.0986122886681098 = 0.946394630357186
        XCTAssertEqual(r.normalizedEntropy, 0.946394630357186, accuracy: 1e-15)
        // penalty 0.75 · 0.946394630357186 = 0.7097959727678895
        // A: 0.5 − 0.7097959727678895; B and the empty reply: 0.25 − 0.7097959727678895
        assertEqual(r.rewards, [-0.2097959727678895, -0.2097959727678895,
                                -0.4597959727678895, -0.4597959727678895], accuracy: 1e-15)
        XCTAssertEqual(r.counts, ["A": 2, "B": 1, "<|IM_END|>": 1])
        XCTAssertEqual(r.majority, "A")
        XCTAssertEqual(r.majorityRatio, 0.5)
        XCTAssertEqual(r.invalidShare, 0)
    }

    func testSingleDistinctAnswerHasNoEntropyTerm() {
        // M = 1: H = 0 and H / ln 1 would be 0/0; the reference defines the term as 0.
        let r = voteRewards(answers: ["C", "C", "C"], denominator: .allVotes)
        XCTAssertEqual(r.entropy, 0)
        XCTAssertEqual(r.normalizedEntropy, 0)
        XCTAssertEqual(r.rewards, [1, 1, 1])
        XCTAssertEqual(r.majorityRatio, 1)
    }

    func testInvalidAnswersCastNoVote() {
        let answers: [String?] = ["A", "A", "B", nil]
        let all = voteRewards(answers: answers, denominator: .allVotes)
        // Valid votes only: p = (2/3, 1/3); H = −(2/3 ln 2/3 + 1/3 ln 1/3) = 0.6365141682948128
        // M = 2: H / ln 2 = 0.9182958340544894; penalty 0.75 · that = 0.6887218755408672
        XCTAssertEqual(all.entropy, 0.6365141682948128, accuracy: 1e-15)
        XCTAssertEqual(all.normalizedEntropy, 0.9182958340544894, accuracy: 1e-15)
        // Shares of all 4 responses: A 2/4, B 1/4, invalid 0, each minus 0.6887218755408672.
        assertEqual(all.rewards, [-0.1887218755408672, -0.1887218755408672,
                                  -0.4387218755408672, -0.6887218755408672])
        XCTAssertEqual(all.counts, ["A": 2, "B": 1])
        XCTAssertEqual(all.invalidShare, 0.25)
        XCTAssertEqual(all.majorityRatio, 0.5)   // 2 of all 4

        // Shares of the 3 valid votes: A 2/3, B 1/3, invalid 0.
        let valid = voteRewards(answers: answers, denominator: .validVotes)
        assertEqual(valid.rewards, [2.0 / 3 - 0.6887218755408672, 2.0 / 3 - 0.6887218755408672,
                                    1.0 / 3 - 0.6887218755408672, -0.6887218755408672])
    }

    func testInvalidReplyNeverBeatsAValidOne() {
        // Four lone letters among 28 invalid replies: M = 4, uniform, H / ln 4 = 1.
        // Valid: 1/32 − 0.75 = −0.71875; invalid: 0 − 0.75 = −0.75. A flat 0 for invalid replies
        // would rank them above every valid answer here.
        let answers: [String?] = ["A", "B", "C", "D"] + Array(repeating: nil, count: 28)
        let r = voteRewards(answers: answers, denominator: .allVotes)
        XCTAssertEqual(r.rewards[0], -0.71875, accuracy: 1e-12)
        XCTAssertEqual(r.rewards[31], -0.75, accuracy: 1e-12)
        let advantages = groupAdvantages(r.rewards)
        XCTAssertGreaterThan(advantages[0], 0)
        XCTAssertLessThan(advantages[31], 0)
    }

    func testAllInvalid() {
        let r = voteRewards(answers: [nil, nil, nil], denominator: .allVotes)
        XCTAssertNil(r.majority)
        XCTAssertEqual(r.rewards, [0, 0, 0])
        XCTAssertEqual(r.invalidShare, 1)
        XCTAssertEqual(r.majorityRatio, 0)
        XCTAssertEqual(groupAdvantages(r.rewards), [0, 0, 0])
        let empty = voteRewards(answers: [], denominator: .validVotes)
        XCTAssertEqual(empty.rewards, [])
        XCTAssertEqual(empty.invalidShare, 0)
    }

    func testMajorityKind() {
        let r = voteRewards(answers: ["A", "B", "A", "C", nil], kind: .majority, denominator: .allVotes)
        // Valid p = (2/4, 1/4, 1/4): H / ln 3 = 0.946394630357186, penalty 0.7097959727678895.
        // Majority A earns 1 − penalty; B, C and the invalid reply 0 − penalty.
        assertEqual(r.rewards, [0.2902040272321105, -0.7097959727678895, 0.2902040272321105,
                                -0.7097959727678895, -0.7097959727678895])
    }

    func testMajorityTieGoesToFirstSeen() {
        // Python's Counter.most_common keeps insertion order among equal counts.
        XCTAssertEqual(voteRewards(answers: ["B", "A", "A", "B"], denominator: .allVotes).majority, "B")
        XCTAssertEqual(voteRewards(answers: [nil, "A", "B", "B", "A"], denominator: .allVotes).majority, "A")
    }

    // MARK: answer prior

    func testWeightedVotesByHand() {
        let r = voteRewards(answers: ["A", "A", "A", "B", nil], denominator: .allVotes, weights: ["A": 0.5, "B": 2])
        // Weighted votes A 3 · 0.5 = 1.5, B 1 · 2 = 2, rescaled to the 4 valid votes: A 12/7, B 16/7, so B is
        // the majority. Shares of all 5 replies: A 12/35, B 16/35, invalid 0.
        // The entropy term is the raw votes': p = (3/4, 1/4), H = 0.5623351446188083, H / ln 2 =
        // 0.8112781244591328, penalty 0.75 · that = 0.6084585933443496.
        let penalty = 0.6084585933443496
        assertEqual(r.rewards, [12.0 / 35 - penalty, 12.0 / 35 - penalty, 12.0 / 35 - penalty, 16.0 / 35 - penalty, -penalty])
        XCTAssertEqual(r.majority, "B")
        XCTAssertEqual(r.majorityRatio, 0.2)   // B's raw count, 1 of 5
        XCTAssertEqual(r.entropy, 0.5623351446188083, accuracy: 1e-15)
        XCTAssertEqual(r.counts, ["A": 3, "B": 1])
    }

    func testEqualWeightsChangeNothing() {
        let answers: [String?] = ["A", "B", "A", "C", nil]
        let plain = voteRewards(answers: answers, denominator: .allVotes)
        let equal = voteRewards(answers: answers, denominator: .allVotes, weights: ["A": 3, "B": 3, "C": 3])
        assertEqual(equal.rewards, plain.rewards, accuracy: 1e-15)
        XCTAssertEqual(equal.majority, plain.majority)
    }

    private func item(_ id: String, _ options: [String]?) -> Item {
        Item(id: id, prompt: "", image: nil, answer: nil, options: options, label: nil)
    }

    func testPriorByHand() {
        var prior = AnswerPrior()
        let x1 = item("1", ["cat", "dog", "bird", "fish"]), x2 = item("2", ["dog", "cat", "cow", "pig"])
        prior.record(.init(item: x1, votes: [VoteCount(answer: "A", count: 3), VoteCount(answer: "B", count: 1)]))
        prior.record(.init(item: x2, votes: [VoteCount(answer: "A", count: 2), VoteCount(answer: "B", count: 2),
                                             VoteCount(answer: nil, count: 4)]))
        // Shares: x1 cat 3/4, dog 1/4; x2 dog 1/2, cat 1/2 (invalid replies cast no vote). With one
        // pseudo-image giving each of 4 options 1/4: π(cat) = (3/4 + 1/2 + 1/4) / 3 = 1/2,
        // π(dog) = (1/4 + 1/2 + 1/4) / 3 = 1/3, π(cow) (offered by x2 only) = (0 + 1/4) / 2 = 1/8,
        // π(horse) (offered by no image) = 1/4.
        let four = ["cat", "dog", "cow", "horse"]
        XCTAssertEqual(prior.table().prior(of: "cat", options: four), 0.5, accuracy: 1e-15)
        XCTAssertEqual(prior.table().prior(of: "dog", options: four), 1.0 / 3, accuracy: 1e-15)
        XCTAssertEqual(prior.table().prior(of: "cow", options: four), 0.125, accuracy: 1e-15)
        XCTAssertEqual(prior.table().prior(of: "horse", options: four), 0.25, accuracy: 1e-15)
        // An image's latest votes replace its earlier ones: x1 now all "bird", π(cat) = (0 + 1/2 + 1/4) / 3.
        prior.record(.init(item: x1, votes: [VoteCount(answer: "C", count: 4)]))
        XCTAssertEqual(prior.table().prior(of: "cat", options: four), 0.25, accuracy: 1e-15)
        // No valid vote, no record.
        prior.record(.init(item: item("3", ["cat", "dog"]), votes: [VoteCount(answer: nil, count: 4)]))
        XCTAssertEqual(prior.images, 2)
    }

    func testOpenEndedPriorByHand() {
        var prior = AnswerPrior()
        prior.record(.init(item: item("a", nil), votes: [VoteCount(answer: "7", count: 2), VoteCount(answer: "8", count: 2)]))
        prior.record(.init(item: item("b", nil), votes: [VoteCount(answer: "7", count: 4)]))
        prior.record(.init(item: item("c", ["7", "8"]), votes: [VoteCount(answer: "B", count: 4)]))
        // Open-ended images only (two answers seen: the pseudo-image gives each 1/2):
        // π(7) = (1/2 + 1 + 1/2) / 3 = 2/3, π(8) = (1/2 + 0 + 1/2) / 3 = 1/3.
        XCTAssertEqual(prior.table().prior(of: "7", options: nil), 2.0 / 3, accuracy: 1e-15)
        XCTAssertEqual(prior.table().prior(of: "8", options: nil), 1.0 / 3, accuracy: 1e-15)
    }

    func testWeightsNeedSeveralImages() {
        var prior = AnswerPrior()
        let options = ["cat", "dog", "bird", "fish"]
        let votes = [VoteCount(answer: "A", count: 3), VoteCount(answer: "B", count: 1)]
        // One image voted on twenty times (--one-example) is one image: no weights.
        for _ in 0..<20 { prior.record(.init(item: item("only", options), votes: votes)) }
        XCTAssertNil(prior.table().weights(for: item("only", options), answers: ["A", "B"], power: 1))
        for i in 1..<(AnswerPrior.minImages - 1) { prior.record(.init(item: item("\(i)", options), votes: votes)) }
        XCTAssertEqual(prior.images, AnswerPrior.minImages - 1)
        XCTAssertNil(prior.table().weights(for: item("only", options), answers: ["A", "B"], power: 1))
        prior.record(.init(item: item("last", options), votes: votes))
        // Every image: cat 3/4, dog 1/4; π(cat) = (8 · 3/4 + 1/4) / 9 = 0.69444…, π(dog) = (8 · 1/4 + 1/4) / 9 = 1/4.
        let w = prior.table().weights(for: item("x", options), answers: ["A", "B", nil, "A"], power: 1)
        XCTAssertEqual(w?.count, 2)
        XCTAssertEqual(w?["A"] ?? 0, 9 / 6.25, accuracy: 1e-12)
        XCTAssertEqual(w?["B"] ?? 0, 4, accuracy: 1e-12)
        XCTAssertEqual(prior.table().weights(for: item("x", options), answers: ["A"], power: 0.5)?["A"] ?? 0,
                       (9 / 6.25).squareRoot(), accuracy: 1e-12)
        XCTAssertNil(prior.table().weights(for: item("x", options), answers: ["A"], power: 0))
    }

    func testBalancedMajorityByHand() {
        // Eight images with options x, y, z, w: six vote A (x) 3 : B (y) 2 and are y; two vote A 5 : 0 and are x.
        // π(x) = (6 · 3/5 + 2 · 1 + 1/4) / 9 = 0.65, π(y) = (6 · 2/5 + 0 + 1/4) / 9 = 0.29444…: on the six,
        // x weighs 3 / 0.65 = 4.6 against y's 2 / 0.2944 = 6.8, so the balanced majority is y. Plain majority:
        // 2 of 8 right; balanced: 8 of 8.
        let options = ["x", "y", "z", "w"]
        var items: [Item] = [], preds: [ItemPrediction] = []
        for i in 0..<8 {
            let answer = i < 6 ? "B" : "A"
            items.append(Item(id: "\(i)", prompt: "", image: nil, answer: answer, options: options, label: nil))
            let votes = i < 6 ? [VoteCount(answer: "A", count: 3), VoteCount(answer: "B", count: 2)]
                : [VoteCount(answer: "A", count: 5)]
            preds.append(ItemPrediction(id: "\(i)", answer: answer, response: "", prediction: nil, correct: false,
                                        votes: votes))
        }
        XCTAssertEqual(balancedMajority(items, preds), 8)
        // Seven images are too few for a prior: the plain majority, right on the last two only.
        XCTAssertEqual(balancedMajority(Array(items.suffix(7)), Array(preds.suffix(7))), 2)
    }

    // MARK: GRPO advantages

    func testGroupAdvantagesByHand() {
        // mean = 1/4; deviations (.75, −.25, −.25, −.25);
        // unbiased var = (.5625 + 3 · .0625) / 3 = .25, std = .5
        // .75 / (.5 + 1e-6) = 1.499997000006; −.25 / .500001 = −0.499999000002
        assertEqual(groupAdvantages([1, 0, 0, 0]),
                    [1.499997000006, -0.499999000002, -0.499999000002, -0.499999000002])
    }

    func testEqualRewardsGiveExactZeros() {
        // 0.1 · 3 / 3 = 0.10000000000000002 in floating point; the naive formula would give
        // about −1.4e-17 / 1e-6 ≈ −1.4e-11 rather than 0.
        XCTAssertEqual(groupAdvantages([0.1, 0.1, 0.1]), [0, 0, 0])
        XCTAssertEqual(groupAdvantages([0.7]), [0])
        XCTAssertEqual(groupAdvantages([]), [])
        XCTAssertEqual(batchAdvantages([[0.1, 0.1], [0.1]]), [[0, 0], [0]])
    }

    /// 32 votes of one prompt as the reference extracts them; the first 16 are trained.
    private let replies = [
        "B", "B", "A", "B.", "<|im_end|>", "B", "C", "B<|im_end|>",
        "A", "B", "b", "<|im_end|>", "B", "D", "B", "A cat",
        "B", "B", "A", "B", "B", "C", "B", "<|im_end|>",
        "B", "B", "A", "B", "B", "B", "C", "B",
    ]

    func testPeerFormulaOn32Votes() {
        let answers = replies.map { extractAnswer($0, mode: .reference) }
        let r = voteRewards(answers: answers, entropyCoef: 0.75, denominator: .allVotes)
        XCTAssertEqual(r.counts, ["B": 20, "A": 5, "C": 3, "<|IM_END|>": 3, "D": 1])
        // H = −(20/32 ln 20/32 + 5/32 ln 5/32 + 2 · 3/32 ln 3/32 + 1/32 ln 1/32) = 1.1359387538853836
        // M = 5: H / ln 5 = 1.1359387538853836 / 1.6094379124341003 = 0.7057984313091018
        XCTAssertEqual(r.entropy, 1.1359387538853836, accuracy: 1e-14)
        XCTAssertEqual(r.normalizedEntropy, 0.7057984313091018, accuracy: 1e-14)
        // penalty 0.75 · 0.7057984313091018 = 0.5293488234818263
        // B 20/32, A 5/32, C and empty 3/32, D 1/32, each minus the penalty:
        let rB = 0.625 - 0.5293488234818263, rA = 0.15625 - 0.5293488234818263
        let rC = 0.09375 - 0.5293488234818263, rD = 0.03125 - 0.5293488234818263
        XCTAssertEqual(rB, 0.09565117651817368, accuracy: 1e-15)
        let expected = [rB, rB, rA, rB, rC, rB, rC, rB, rA, rB, rB, rC, rB, rD, rB, rA]
        assertEqual(Array(r.rewards[..<16]), expected)

        // First 16: B ×9, A ×3, C ×1, D ×1, empty ×2.
        // mean = (9 · .625 + 3 · .15625 + 3 · .09375 + .03125) / 16 − penalty
        //      = 6.40625 / 16 − 0.5293488234818263 = −0.12895819848182635
        // unbiased std (Python statistics.stdev) = 0.26472734351828864
        // B: (0.09565117651817368 + 0.12895819848182635) / (0.26472734351828864 + 1e-6) = 0.848452311584396
        let aB = 0.848452311584396, aA = -0.9222307734612998
        let aC = -1.1583218514673927, aD = -1.3944129294734855
        let advantages = groupAdvantages(Array(r.rewards[..<16]))
        assertEqual(advantages, [aB, aB, aA, aB, aC, aB, aC, aB, aA, aB, aB, aC, aB, aD, aB, aA],
                    accuracy: 1e-9)
    }

    func testEntropyTermCancelsPerGroup() {
        let answers = replies.map { extractAnswer($0, mode: .reference) }
        let with = voteRewards(answers: answers, entropyCoef: 0.75, denominator: .allVotes)
        let without = voteRewards(answers: answers, entropyCoef: 0, denominator: .allVotes)
        XCTAssertNotEqual(with.rewards, without.rewards)
        assertEqual(groupAdvantages(Array(with.rewards[..<16])),
                    groupAdvantages(Array(without.rewards[..<16])), accuracy: 1e-12)
    }

    func testBatchNormalisationByHand() {
        // Group 1 unanimous: rewards 1. Group 2 split A/A/B/B: p = (.5, .5), H / ln 2 = 1,
        // rewards .5 − .75 = −.25. Per group both are constant: zero advantages.
        let g1 = voteRewards(answers: ["A", "A", "A", "A"], denominator: .allVotes).rewards
        let g2 = voteRewards(answers: ["A", "A", "B", "B"], denominator: .allVotes).rewards
        XCTAssertEqual(g2, [-0.25, -0.25, -0.25, -0.25])
        XCTAssertEqual(groupAdvantages(g1) + groupAdvantages(g2), Array(repeating: 0, count: 8))
        // Over the batch: mean = (4 · 1 − 4 · .25) / 8 = .375, deviations ±.625,
        // unbiased var = 8 · .390625 / 7 = .44642857142857145, std = 0.6681531047810609
        // ±.625 / (0.6681531047810609 + 1e-6) = ±0.9354129466955806
        let batch = batchAdvantages([g1, g2])
        assertEqual(batch[0], Array(repeating: 0.9354129466955806, count: 4))
        assertEqual(batch[1], Array(repeating: -0.9354129466955806, count: 4))
    }

    func testEntropyTermSurvivesBatchNormalisation() {
        // Groups with different entropy: the per-group constant no longer cancels.
        let votes: [[String?]] = [["A", "A", "A", "B"], ["A", "B", "C", "D"], ["C", "C", "D", "D"]]
        func advantages(_ coef: Double) -> (group: [[Double]], batch: [[Double]]) {
            let rewards = votes.map { voteRewards(answers: $0, entropyCoef: coef, denominator: .allVotes).rewards }
            return (rewards.map { groupAdvantages($0) }, batchAdvantages(rewards))
        }
        let (group75, batch75) = advantages(0.75)
        let (group0, batch0) = advantages(0)
        for (a, b) in zip(group75, group0) { assertEqual(a, b) }
        let gap = zip(batch75.joined(), batch0.joined()).map { abs($0 - $1) }.max()!
        XCTAssertGreaterThan(gap, 0.1)
        // Batch normalisation keeps the shape of the groups.
        XCTAssertEqual(batch75.map(\.count), [4, 4, 4])
    }
}

final class CollapseGuardTests: XCTestCase {
    private func stats(_ step: Int, invalid: Double = 0.1, length: Double = 3, entropy: Double = 0.3,
                       majorities: [String?] = ["A", "B", "C", "D"]) -> CollapseGuard.StepStats {
        CollapseGuard.StepStats(step: step, majorityRatio: 0.7, invalidShare: invalid, meanResponseLength: length,
                  answerEntropy: entropy, majorities: majorities)
    }

    func testHealthyRunNeverStops() {
        var g = CollapseGuard()
        for step in 0..<20 { XCTAssertFalse(g.observe(stats(step))) }
        XCTAssertNil(g.stopReason)
        XCTAssertEqual(g.lastGoodStep, 19)
    }

    func testFormatRepairFromMostlyEmptyRepliesIsNotACollapse() {
        // A base model that mostly replies empty: invalid shares start high and fall.
        var g = CollapseGuard()
        let shares = [0.8, 0.85, 0.7, 0.5, 0.2]
        for (step, share) in shares.enumerated() {
            XCTAssertFalse(g.observe(stats(step, invalid: share, majorities: [nil, nil, "A", "B"])))
        }
    }

    func testRisingInvalidShareStopsAfterTwoSteps() {
        var g = CollapseGuard()
        g.observe(stats(0, invalid: 0.1))
        g.observe(stats(1, invalid: 0.2))
        XCTAssertFalse(g.observe(stats(2, invalid: 0.6)))   // one step over 0.5: a warning
        XCTAssertFalse(g.observe(stats(3, invalid: 0.3)))   // recovered: the run resets
        XCTAssertFalse(g.observe(stats(4, invalid: 0.6)))
        XCTAssertTrue(g.observe(stats(5, invalid: 0.7)))
        XCTAssertEqual(g.stopReason, .invalidAnswers(share: 0.7))
        XCTAssertEqual(g.lastGoodStep, 3)
        // Final: later healthy steps neither clear the stop nor move the checkpoint.
        XCTAssertTrue(g.observe(stats(6)))
        XCTAssertEqual(g.lastGoodStep, 3)
    }

    /// Hand-worked: KL 0, 0.01, 0.05, then 0.3 > 0.1 — the weights step 2 left have drifted, so the run
    /// falls back to the start, though steps 0–2 showed no other sign.
    func testPolicyDriftStopsAndFallsBackToTheStart() {
        var g = CollapseGuard()
        for (step, kl) in [0, 0.01, 0.05].enumerated() {
            var s = stats(step)
            s.kl = kl
            XCTAssertFalse(g.observe(s))
        }
        XCTAssertEqual(g.lastGoodStep, 2)
        var s = stats(3)
        s.kl = 0.3
        XCTAssertTrue(g.observe(s))
        XCTAssertEqual(g.stopReason, .policyDrift(kl: 0.3))
        XCTAssertNil(g.lastGoodStep, "the start")
    }

    func testInvalidMajoritiesStop() {
        var g = CollapseGuard()
        g.observe(stats(0))
        // 3 of 4 prompts without a valid majority (0.75 > 0.5 and > 0 + 0.1), twice.
        let bad: [String?] = [nil, nil, nil, "A"]
        XCTAssertFalse(g.observe(stats(1, invalid: 0.45, majorities: bad)))
        XCTAssertTrue(g.observe(stats(2, invalid: 0.45, majorities: bad)))
        XCTAssertEqual(g.stopReason, .invalidMajority(share: 0.75))
        XCTAssertEqual(g.lastGoodStep, 0)
    }

    func testEmptyResponsesStopAtOnce() {
        var g = CollapseGuard()
        g.observe(stats(0, invalid: 0.2))
        XCTAssertTrue(g.observe(stats(1, invalid: 0.95, length: 1, majorities: [nil, nil, nil, nil])))
        XCTAssertEqual(g.stopReason, .emptyResponses(meanLength: 1))
    }

    func testShortButValidRepliesAreFine() {
        // One letter plus the end token is 2 tokens; even 1 token with no rise in invalid
        // replies is no collapse.
        var g = CollapseGuard()
        for step in 0..<5 { XCTAssertFalse(g.observe(stats(step, invalid: 0.05, length: 1))) }
    }

    func testConstantAnswerStopsAfterThreeSteps() {
        var g = CollapseGuard()
        let allA: [String?] = ["A", "A", "A", "A"]
        g.observe(stats(0))
        XCTAssertFalse(g.observe(stats(1, entropy: 0, majorities: allA)))
        XCTAssertFalse(g.observe(stats(2, entropy: 0, majorities: allA)))
        XCTAssertTrue(g.observe(stats(3, entropy: 0, majorities: allA)))
        XCTAssertEqual(g.stopReason, .constantAnswer("A"))
        XCTAssertEqual(g.lastGoodStep, 0)
    }

    func testConstantAnswerNeedsTheSameAnswerUnanimouslyOnEnoughPrompts() {
        var g = CollapseGuard()
        let allA: [String?] = ["A", "A", "A", "A"]
        let allB: [String?] = ["B", "B", "B", "B"]
        // The answer changes: the run restarts.
        for (step, m) in [allA, allA, allB, allB].enumerated() {
            XCTAssertFalse(g.observe(stats(step, entropy: 0, majorities: m)))
        }
        // Some dissent within prompts (entropy > 0): not unanimous.
        var h = CollapseGuard()
        for step in 0..<5 { XCTAssertFalse(h.observe(stats(step, entropy: 0.2, majorities: allA))) }
        // 2 prompts a step: 3 steps cover 6 < 8 prompts, too few to tell from chance.
        var k = CollapseGuard()
        for step in 0..<3 { XCTAssertFalse(k.observe(stats(step, entropy: 0, majorities: ["C", "C"]))) }
        XCTAssertTrue(k.observe(stats(3, entropy: 0, majorities: ["C", "C"])))
        // One image repeated (--one-example) agrees with itself whatever the health of the run: the prompts
        // of every step are one item, so no run of steps covers 8 items (measured before this rule: 2 of 3
        // one-example runs on shot noise 5 were stopped at steps 3 and 8 for "constant answer B").
        var one = CollapseGuard()
        for step in 0..<10 {
            var s = stats(step, entropy: 0, majorities: ["B", "B", "B", "B"])
            s.itemIds = Array(repeating: "test-0", count: 4)
            XCTAssertFalse(one.observe(s), "step \(step)")
        }
        // Distinct items with ids count as before.
        var ids = CollapseGuard()
        for step in 0..<3 {
            var s = stats(step, entropy: 0, majorities: ["B", "B", "B", "B"])
            s.itemIds = (0..<4).map { "item-\(step * 4 + $0)" }
            XCTAssertEqual(ids.observe(s), step == 2, "step \(step)")
        }
    }

    func testStatsFromVotes() {
        let votes = [
            voteRewards(answers: ["A", "A", nil, "B"], denominator: .allVotes),  // ratio .5, 1 invalid
            voteRewards(answers: ["C", "C", "C", "C"], denominator: .allVotes),  // ratio 1, H 0
        ]
        let s = CollapseGuard.StepStats(step: 4, votes: votes, meanResponseLength: 2.5)
        XCTAssertEqual(s.majorityRatio, 0.75)            // (.5 + 1) / 2
        XCTAssertEqual(s.invalidShare, 0.125)            // 1 of 8 replies
        XCTAssertEqual(s.majorities, ["A", "C"])
        // Prompt 1: valid p = (2/3, 1/3), H / ln 2 = 0.9182958340544894; prompt 2: 0.
        XCTAssertEqual(s.answerEntropy, 0.9182958340544894 / 2, accuracy: 1e-15)
    }
}
