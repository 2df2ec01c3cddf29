import Foundation

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and the same stream on every platform
/// and run — unlike the system generator or Swift's per-process-seeded `Hasher`.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in 0..<n without modulo bias: draws below 2^64 mod n are rejected so that every
    /// residue is hit by equally many accepted draws.
    public mutating func below(_ n: Int) -> Int {
        precondition(n > 0)
        let bound = UInt64(n)
        let reject = (0 &- bound) % bound
        while true {
            let x = next()
            if x >= reject { return Int(x % bound) }
        }
    }
}

/// The seed of one item: stable across runs and processes, different for every
/// (dataset seed, item id) pair. FNV-1a over the id's UTF-8 bytes, mixed with the dataset seed
/// through one SplitMix64 step so that nearby seeds or ids give unrelated streams.
public func multipleChoiceSeed(datasetSeed: UInt64, itemID: String) -> UInt64 {
    var h: UInt64 = 0xCBF2_9CE4_8422_2325
    for b in itemID.utf8 {
        h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3
    }
    var rng = SplitMix64(seed: datasetSeed ^ h)
    return rng.next()
}

/// The reference's recognition prompt (DTD asks for the texture instead).
public func recognitionPrompt(options: [String], texture: Bool = false) -> String {
    precondition(options.count == 4, "the recognition prompt has four options")
    let what = texture ? "what texture it shows" : "what it shows"
    return "<image> \n Look at the given image and identify \(what). Choose the correct answer "
        + "from the options below and respond with only the corresponding option letter "
        + "(A, B, C, or D). Do not include any explanation or extra text. \n Options:\n"
        + zip(optionLetters(count: 4), options).map { "\($0). \($1)" }.joined(separator: "\n")
}

/// A 4-way recognition question for class `correct`: three distractors drawn without
/// replacement from the other class names, the correct answer at a uniformly drawn letter,
/// distractors filling the remaining letters in draw order. Deterministic in `itemSeed`
/// (see `multipleChoiceSeed`). Class names are used raw ("king_penguin"), as in the reference;
/// names equal to the correct one are never distractors, and a repeated name is drawn once.
public func buildMultipleChoice(
    classNames: [String], correct: Int, itemSeed: UInt64, texture: Bool = false
) -> (prompt: String, options: [String], answerLetter: String) {
    precondition(classNames.indices.contains(correct), "correct class out of range")
    let answer = classNames[correct]
    var seen: Set<String> = [answer]
    var pool = classNames.filter { seen.insert($0).inserted }
    precondition(pool.count >= 3, "need at least three class names other than the answer")

    var rng = SplitMix64(seed: itemSeed)
    // Partial Fisher–Yates: the first three slots end up a uniform draw without replacement.
    for i in 0..<3 {
        pool.swapAt(i, i + rng.below(pool.count - i))
    }
    let position = rng.below(4)
    var options = Array(pool.prefix(3))
    options.insert(answer, at: position)
    let letter = optionLetters(count: 4)[position]
    return (recognitionPrompt(options: options, texture: texture), options, letter)
}
