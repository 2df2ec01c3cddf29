import Foundation
import Models
import Torch

/// A single-line progress display with rate and ETA (stderr; one line per update when not a TTY).
public final class Progress {
    let label: String, total: Int
    let start = Date()
    var lastPrint = Date.distantPast
    let tty = isatty(2) != 0

    public init(_ label: String, total: Int) {
        self.label = label
        self.total = total
    }

    public func update(_ done: Int, _ extra: String = "", force: Bool = false) {
        let now = Date()
        guard force || done == total || now.timeIntervalSince(lastPrint) > (tty ? 0.2 : 5) else { return }
        lastPrint = now
        let elapsed = now.timeIntervalSince(start)
        let rate = elapsed > 0 ? Double(done) / elapsed : 0
        let eta = rate > 0 ? Double(total - done) / rate : 0
        let pct = total > 0 ? 100 * done / total : 100
        let line = "[\(label)] \(done)/\(total) \(pct)% \(String(format: "%.2f", rate))/s elapsed \(Self.clock(elapsed)) ETA \(Self.clock(eta)) \(extra)"
        FileHandle.standardError.write(((tty ? "\r\u{1B}[K" : "") + line + (tty && done < total ? "" : "\n")).data(using: .utf8)!)
    }

    public static func clock(_ s: Double) -> String {
        let t = Int(s.rounded())
        return t >= 3600 ? String(format: "%dh%02dm", t / 3600, t / 60 % 60) : String(format: "%dm%02ds", t / 60, t % 60)
    }
}

public struct EvalOptions: Sendable {
    public var limit: Int?
    /// Also draw this many samples per item (T=1) for maj@N and pass@N; 0 = greedy only.
    public var votes = 0
    public var batchSize = 16
    public var maxTokens = 16
    public var answerMode: AnswerStyle = .strict
    public var seed: UInt64 = 0
    /// Longer side of the PNG thumbnail stored with each prediction (for reports); 0 = none.
    public var thumbnailSide = 48
    public init() {}
}

/// How replies become answers: `.strict` (a valid option only) or the reference's parser.
public enum AnswerStyle: String, Codable, Sendable { case strict, reference }

public struct ItemPrediction: Codable, Sendable {
    public var id: String
    public var answer: String?
    public var response: String
    public var prediction: String?
    public var correct: Bool
    public var majority: String?
    public var majorityCorrect: Bool?
    public var passAtN: Bool?
    // For reports; absent in files written before they were added.
    public var options: [String]?
    /// The label as text (class name / VQA answer).
    public var label: String?
    public var imagePath: String?
    /// Base64 PNG, longer side at most EvalOptions.thumbnailSide.
    public var thumbnail: String?
    /// With --votes: how many samples gave each answer (nil answer = invalid), most first.
    public var votes: [VoteCount]?
}

public struct VoteCount: Codable, Sendable, Equatable {
    public var answer: String?
    public var count: Int
    public init(answer: String?, count: Int) {
        self.answer = answer
        self.count = count
    }

    /// Counts in descending order; ties in order of first appearance.
    public static func histogram(_ answers: [String?]) -> [VoteCount] {
        var out: [VoteCount] = []
        for a in answers {
            if let i = out.firstIndex(where: { $0.answer == a }) { out[i].count += 1 } else { out.append(VoteCount(answer: a, count: 1)) }
        }
        return out.enumerated().sorted { ($0.element.count, -$0.offset) > ($1.element.count, -$1.offset) }.map(\.element)
    }
}

public struct EvalReport: Codable, Sendable {
    public var dataset: String
    public var model: String
    public var items: Int
    /// Greedy pass@1 accuracy in 0–1 (the reference's metric).
    public var accuracy: Double
    public var invalidShare: Double
    public var majAccuracy: Double?
    public var passAtN: Double?
    /// Share of items whose majority answer differs from the greedy one: the room self-consistency
    /// training has (0 when sampling only ever confirms the greedy answer).
    public var majorityDiffersShare: Double?
    /// Accuracy of the majority after each answer's votes are divided by its prior over all evaluated items
    /// (`AnswerPrior`, power 1): what the answer-balanced reward steers towards, label-free.
    public var balancedMajAccuracy: Double?
    public var votes: Int
    public var seconds: Double
    public var imagesPerSecond: Double
    public var predictions: [ItemPrediction]

    enum CodingKeys: String, CodingKey {
        case dataset, model, items, accuracy, invalidShare = "invalid_share", majAccuracy = "maj_accuracy"
        case passAtN = "pass_at_n", majorityDiffersShare = "majority_differs_share"
        case balancedMajAccuracy = "balanced_maj_accuracy", votes, seconds
        case imagesPerSecond = "images_per_s", predictions
    }
}

/// The answer a reply gives for `item` under `style` (nil = invalid).
func answerOf(_ c: Completion, item: Item, style: AnswerStyle) -> String? {
    switch style {
    case .strict: return extractAnswer(c.text, mode: item.answerMode)
    case .reference:
        // The reference decodes with special tokens kept: a reply ending on the stop token
        // carries it (an empty reply is the literal "<|im_end|>").
        return extractReferenceAnswer(c.finish == .stop ? c.text + "<|im_end|>" : c.text)
    }
}

func isCorrect(_ prediction: String?, _ item: Item) -> Bool {
    guard let p = prediction, let a = item.answer else { return false }
    if item.options != nil { return p == a }
    return p == normalizeOpenAnswer(a)
}

public enum Evaluator {
    /// With several processes (`distributed`), rank r evaluates batches r, r + worldSize, ... (the
    /// same batches, hence the same results, as one process) and every rank returns the whole
    /// report, predictions in dataset order.
    public static func run(_ vlm: VisionLanguageModel, dataset: Dataset, modelName: String, options: EvalOptions,
                           progressLabel: String = "eval", distributed: Distributed = .single) throws -> EvalReport {
        let items = Array(dataset.items.prefix(options.limit ?? dataset.items.count))
        let gen = TextGenerator(lm: vlm.lm, tokenizer: vlm.tokenizer, stopIds: vlm.stopIds)
        let batches = Array(stride(from: 0, to: items.count, by: options.batchSize))
        let mine = batches.indices.filter { $0 % distributed.worldSize == distributed.rank }.map { batches[$0] }
        let progress = Progress(progressLabel, total: mine.reduce(0) { $0 + min(options.batchSize, items.count - $1) })
        var preds: [ItemPrediction] = []
        var correct = 0
        let t0 = Date()
        for start in mine {
            let chunk = Array(items[start..<min(items.count, start + options.batchSize)])
            let images = try chunk.map { try $0.image?.load() }
            try noGrad { try vlm.prefetchImageFeatures(images.compactMap { $0 }) }
            let prompts = try noGrad { try zip(chunk, images).map { try vlm.prepare(text: $0.prompt, image: $1, system: nil) } }
            let outs = try gen.generateBatch(prompts, params: .greedy(maxTokens: options.maxTokens))
            for (k, (item, out)) in zip(chunk, outs).enumerated() {
                let pred = answerOf(out, item: item, style: options.answerMode)
                var p = ItemPrediction(id: item.id, answer: item.answer, response: out.text, prediction: pred, correct: isCorrect(pred, item),
                                       options: item.options, label: item.label)
                if case .file(let url) = item.image { p.imagePath = url.path }
                if options.thumbnailSide > 0, let img = images[k] {
                    p.thumbnail = img.thumbnail(maxSide: options.thumbnailSide).pngData()?.base64EncodedString()
                }
                if p.correct { correct += 1 }
                if options.votes > 0 {
                    let samples = try gen.generate(prompts[k], samples: options.votes,
                                                   params: SamplingParams(temperature: 1, maxTokens: options.maxTokens, seed: options.seed &+ UInt64(start + k)))
                    let answers = samples.map { answerOf($0, item: item, style: options.answerMode) }
                    let vote = voteRewards(answers: answers, entropyCoef: 0, denominator: .allVotes)
                    p.majority = vote.majority
                    p.votes = VoteCount.histogram(answers)
                    p.majorityCorrect = isCorrect(vote.majority, item)
                    p.passAtN = answers.contains { isCorrect($0, item) }
                }
                preds.append(p)
            }
            progress.update(preds.count, String(format: "acc %.3f", Double(correct) / Double(preds.count)))
        }
        if distributed.worldSize > 1 {
            let gathered = try distributed.allgather(bytes: Array(try JSONEncoder().encode(preds)))
            let perRank = try gathered.map { try JSONDecoder().decode([ItemPrediction].self, from: Data($0)) }
            preds = try interleaveBatches(perRank, sizes: batches.map { min(options.batchSize, items.count - $0) })
        }
        let n = max(1, items.count)
        let count = { (f: (ItemPrediction) -> Bool) in preds.filter(f).count }
        correct = count(\.correct)
        let invalid = zip(items, preds).filter { extractAnswer($1.response, mode: $0.answerMode) == nil }.count
        let majCorrect = count { $0.majorityCorrect == true }, passN = count { $0.passAtN == true }
        let differs = count { $0.votes != nil && $0.majority != $0.prediction }
        let secs = Date().timeIntervalSince(t0)
        return EvalReport(dataset: dataset.name, model: modelName, items: items.count, accuracy: Double(correct) / Double(n),
                          invalidShare: Double(invalid) / Double(n),
                          majAccuracy: options.votes > 0 ? Double(majCorrect) / Double(n) : nil,
                          passAtN: options.votes > 0 ? Double(passN) / Double(n) : nil,
                          majorityDiffersShare: options.votes > 0 ? Double(differs) / Double(n) : nil,
                          balancedMajAccuracy: options.votes > 0 ? balancedMajority(items, preds) / Double(n) : nil,
                          votes: options.votes,
                          seconds: secs, imagesPerSecond: Double(items.count) / max(secs, 1e-9), predictions: preds)
    }
}

/// How many items the answer-balanced majority gets right (the prior taken over every item's votes).
func balancedMajority(_ items: [Item], _ preds: [ItemPrediction]) -> Double {
    var prior = AnswerPrior()
    for (item, p) in zip(items, preds) { prior.record(.init(item: item, votes: p.votes ?? [])) }
    let table = prior.table()
    return zip(items, preds).reduce(0.0) { sum, pair in
        let (item, p) = pair
        let answers = (p.votes ?? []).flatMap { Array(repeating: $0.answer, count: $0.count) }
        let vote = voteRewards(answers: answers, entropyCoef: 0, denominator: .allVotes,
                               weights: table.weights(for: item, answers: answers, power: 1))
        return sum + (isCorrect(vote.majority, item) ? 1 : 0)
    }
}

/// Batch b of `sizes` came from rank b % perRank.count, in order: the items back in dataset order.
func interleaveBatches<T>(_ perRank: [[T]], sizes: [Int]) throws -> [T] {
    for (r, got) in perRank.enumerated() {
        let want = sizes.indices.filter { $0 % perRank.count == r }.reduce(0) { $0 + sizes[$1] }
        guard got.count == want else {
            throw DistributedError.collective("eval gather: rank \(r) sent \(got.count) predictions, expected \(want)")
        }
    }
    var next = [Int](repeating: 0, count: perRank.count)
    var out: [T] = []
    for (b, size) in sizes.enumerated() {
        let r = b % perRank.count
        out += perRank[r][next[r]..<(next[r] + size)]
        next[r] += size
    }
    return out
}

/// JSON written atomically with sorted keys.
public func writeJSON<T: Encodable>(_ value: T, to url: URL) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
    try enc.encode(value).write(to: url, options: .atomic)
}
