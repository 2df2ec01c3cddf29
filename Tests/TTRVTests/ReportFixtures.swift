import Foundation
@testable import Models
@testable import TTRV

/// Synthetic `ttrv adapt --out` directories: hand-chosen accuracies and step logs, so report
/// tests need no model.
enum SyntheticRun {
    static let classes = Array(Dataset.fashionClasses.prefix(4))

    /// A 28×28 gray picture whose bright square grows with the class index.
    static func thumbnail(_ cls: Int) -> String {
        var px = [UInt8](repeating: 20, count: 28 * 28)
        let side = 6 + 4 * cls
        for y in (14 - side / 2)..<(14 + side / 2) { for x in (14 - side / 2)..<(14 + side / 2) { px[y * 28 + x] = 230 } }
        return Image(width: 28, height: 28, channels: 1, pixels: px).pngData()!.base64EncodedString()
    }

    /// `n` items; item i has class i % 4 with options in a fixed rotation. `right(i)` says whether
    /// the greedy answer is the label, otherwise it is the next option.
    static func predictions(_ n: Int, votes: Int, right: (Int) -> Bool) -> [ItemPrediction] {
        (0..<n).map { i in
            let cls = i % classes.count
            let options = (0..<4).map { classes[($0 + i) % 4] }
            let letters = ["A", "B", "C", "D"]
            let answer = letters[options.firstIndex(of: classes[cls])!]
            let given = right(i) ? answer : letters[(letters.firstIndex(of: answer)! + 1) % 4]
            var p = ItemPrediction(id: "test-\(i)", answer: answer, response: given, prediction: given, correct: right(i),
                                   options: options, label: classes[cls], thumbnail: thumbnail(cls))
            if votes > 0 {
                p.votes = [VoteCount(answer: given, count: votes - 2), VoteCount(answer: nil, count: 2)]
                p.majority = given
                p.majorityCorrect = right(i)
            }
            return p
        }
    }

    static func eval(_ preds: [ItemPrediction], votes: Int, name: String = "fashion-mnist-c:contrast:5") -> EvalReport {
        let acc = Double(preds.filter(\.correct).count) / Double(preds.count)
        return EvalReport(dataset: name, model: "default", items: preds.count, accuracy: acc, invalidShare: 0.05,
                          majAccuracy: votes > 0 ? acc : nil, passAtN: votes > 0 ? min(1, acc + 0.1) : nil, votes: votes,
                          seconds: 2, imagesPerSecond: Double(preds.count) / 2, predictions: preds)
    }

    /// Step `i` of a run; `variant` shifts the curves so that runs differ.
    static func step(_ i: Int, variant: Int = 0) -> StepLog {
        let t = Double(i), v = Double(variant)
        let majority: Double = 0.5 + (0.02 + 0.008 * v) * t, kl: Double = (1 + v) * 1e-4 * t
        let lr: Double = 2e-5 * (1 - t / 10)
        return StepLog(step: i, epoch: i / 4, rewardMean: 0.4 + 0.05 * t, rewardStd: 0.2, majorityRatio: majority,
                       invalidShare: 0.2 - 0.02 * t, answerEntropy: 0.6 - 0.04 * t, responseLength: 2 + 0.1 * t,
                       kl: kl, pgLoss: 0.01, clipFraction: 0.01 * t, ratioMaxAbsLog: 0.05 * (t + 1), samplerMaxAbsLog: 1e-6,
                       gradNorm: 0.5 + 0.1 * t,
                       updates: 1, skippedUpdates: 0, lr: lr, seconds: 10 + t, rolloutSeconds: 5, oldRefSeconds: 1,
                       trainSeconds: 3, optimizerSeconds: 0.5, labelAccuracy: 0.5 + 0.05 * t, majorities: ["A", nil])
    }

    /// Writes a run directory. `gain` (share of items) turns that many wrong items right.
    @discardableResult
    static func write(to dir: URL, steps: Int = 8, items: Int = 40, before: Double = 0.5, gain: Double = 0.1,
                      seed: UInt64 = 0, data: String = "fashion-mnist-c:contrast:5", loraRank: Int? = 8,
                      votes: Int = 0, olderLog: Bool = false) throws -> AdaptReport {
        let rightBefore = Int((before * Double(items)).rounded()), fixed = Int((gain * Double(items)).rounded())
        // Items 0..<rightBefore right before; after, the next `fixed` ones turn right too (or, for
        // a negative gain, the last ones turn wrong).
        let b = eval(predictions(items, votes: votes) { $0 < rightBefore }, votes: votes, name: data)
        let a = eval(predictions(items, votes: votes) { $0 < rightBefore + fixed }, votes: votes, name: data)
        var o = AdaptOptions()
        o.seed = seed
        o.loraRank = loraRank
        o.evalLimit = items
        let log = (0..<steps).map { step($0, variant: Int(seed) + (data.contains("noise") ? 3 : 0)) }
        let report = AdaptReport(accuracyBefore: b.accuracy, accuracyAfter: a.accuracy, evalItems: items, adaptItems: 20,
                                 steps: steps, seconds: Double(steps) * 12, dataset: data, evalDataset: data, model: "default",
                                 mode: .default, stoppedEarly: nil, visionNorm: true, trainedParts: [.projector, .lm],
                                 trainableParameters: 123_456, command: "ttrv adapt --data \(data) --seed \(seed)", options: o, log: log)
        try writeJSON(report, to: dir.appendingPathComponent("report.json"))
        try writeJSON(b, to: dir.appendingPathComponent("eval_before.json"))
        try writeJSON(a, to: dir.appendingPathComponent("eval_after.json"))
        // An older log, written before the ratio field existed, must still load.
        let enc = JSONEncoder()
        enc.outputFormatting = .sortedKeys
        let ratio = try NSRegularExpression(pattern: "\"(ratio_max_abs_log|updates)\":[^,}]*,?")
        let lines = try log.map { l -> String in
            let s = String(decoding: try enc.encode(l), as: UTF8.self)
            guard olderLog else { return s }
            return ratio.stringByReplacingMatches(in: s, range: NSRange(s.startIndex..., in: s), withTemplate: "")
        }
        try (lines.joined(separator: "\n") + "\n").write(to: dir.appendingPathComponent("adapt_log.jsonl"), atomically: true, encoding: .utf8)
        return report
    }

    static func tempDir(_ name: String) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("ttrv-report-\(name)-\(getpid())")
        try? FileManager.default.removeItem(at: url)
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }
}
