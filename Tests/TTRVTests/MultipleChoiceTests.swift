import XCTest
@testable import TTRV

final class MultipleChoiceTests: XCTestCase {
    private let names = ["tench", "goldfish", "king_penguin", "tabby", "tiger_shark", "hen"]

    func testSplitMix64ReferenceStream() {
        // The published SplitMix64 outputs for seed 0.
        var rng = SplitMix64(seed: 0)
        XCTAssertEqual(rng.next(), 0xE220_A839_7B1D_CDAF)
        XCTAssertEqual(rng.next(), 0x6E78_9E6A_A1B9_65F4)
        XCTAssertEqual(rng.next(), 0x06C4_5D18_8009_454F)
    }

    func testItemSeedIsPinned() {
        // Recomputed in Python: FNV-1a 64 of "120" xor dataset seed, one SplitMix64 output.
        // Pinned because changing it silently changes every generated question set.
        XCTAssertEqual(multipleChoiceSeed(datasetSeed: 0, itemID: "120"), 0xAB39_CD2F_91CE_7B4D)
        XCTAssertEqual(multipleChoiceSeed(datasetSeed: 7, itemID: "120"), 0xD7F7_D7C5_80B1_8B85)
        XCTAssertNotEqual(multipleChoiceSeed(datasetSeed: 0, itemID: "12"),
                          multipleChoiceSeed(datasetSeed: 0, itemID: "120"))
    }

    func testDrawIsPinned() {
        // Python mirror: pool without the answer, partial Fisher–Yates over 3 slots with
        // rejection-sampled indices, then the answer's position.
        let q = buildMultipleChoice(classNames: names, correct: 2,
                                    itemSeed: multipleChoiceSeed(datasetSeed: 0, itemID: "120"))
        XCTAssertEqual(q.options, ["hen", "tench", "goldfish", "king_penguin"])
        XCTAssertEqual(q.answerLetter, "D")
    }

    func testDeterministicPerSeedAndVariedAcrossSeeds() {
        var distinct = Set<[String]>()
        for i in 0..<100 {
            let seed = multipleChoiceSeed(datasetSeed: 3, itemID: String(i))
            let a = buildMultipleChoice(classNames: names, correct: 0, itemSeed: seed)
            let b = buildMultipleChoice(classNames: names, correct: 0, itemSeed: seed)
            XCTAssertEqual(a.prompt, b.prompt)
            XCTAssertEqual(a.answerLetter, b.answerLetter)
            distinct.insert(a.options)
        }
        // 5·4·3 distractor orders × 4 positions = 240 possible; 100 draws hit many of them.
        XCTAssertGreaterThan(distinct.count, 50)
    }

    func testCorrectLetterIsUniform() {
        var counts = [String: Int]()
        for i in 0..<4000 {
            let seed = multipleChoiceSeed(datasetSeed: 11, itemID: "item-\(i)")
            counts[buildMultipleChoice(classNames: names, correct: i % names.count, itemSeed: seed).answerLetter, default: 0] += 1
        }
        XCTAssertEqual(Set(counts.keys), ["A", "B", "C", "D"])
        // χ² with 3 degrees of freedom against 1000 each; 16.27 is the 0.1% critical value.
        let chi2 = counts.values.reduce(0.0) { $0 + pow(Double($1) - 1000, 2) / 1000 }
        XCTAssertLessThan(chi2, 16.27, "\(counts)")
    }

    func testDistractorsAreDistinctOtherClassesAndAllGetDrawn() {
        var drawn = Set<String>()
        for i in 0..<500 {
            let correct = i % names.count
            let q = buildMultipleChoice(classNames: names, correct: correct, itemSeed: UInt64(i))
            XCTAssertEqual(Set(q.options).count, 4)
            let index = Int(q.answerLetter.unicodeScalars.first!.value) - 65
            XCTAssertEqual(q.options[index], names[correct])
            XCTAssertEqual(q.options.filter { $0 == names[correct] }.count, 1)
            if correct == 0 { drawn.formUnion(q.options.filter { $0 != names[0] }) }
        }
        XCTAssertEqual(drawn, Set(names.dropFirst()))
    }

    func testRepeatedClassNamesAreNeverDuplicateOptions() {
        let repeated = ["cat", "cat", "dog", "dog", "bird", "fish"]
        for seed in 0..<200 {
            let q = buildMultipleChoice(classNames: repeated, correct: 1, itemSeed: UInt64(seed))
            XCTAssertEqual(Set(q.options), ["cat", "dog", "bird", "fish"])
        }
    }

    func testExactPromptText() {
        let expected = "<image> \n Look at the given image and identify what it shows. Choose the correct answer from the options below and respond with only the corresponding option letter (A, B, C, or D). Do not include any explanation or extra text. \n Options:\nA. tench\nB. king_penguin\nC. goldfish\nD. tabby"
        XCTAssertEqual(recognitionPrompt(options: ["tench", "king_penguin", "goldfish", "tabby"]), expected)
        let texture = recognitionPrompt(options: ["banded", "dotted", "woven", "porous"], texture: true)
        XCTAssertTrue(texture.hasPrefix("<image> \n Look at the given image and identify what texture it shows. Choose"))

        let q = buildMultipleChoice(classNames: names, correct: 2, itemSeed: 5)
        XCTAssertEqual(q.prompt, recognitionPrompt(options: q.options))
        // The prompt round-trips through the dataset parser and strict answer mode.
        XCTAssertEqual(parseOptions(q.prompt), q.options)
        XCTAssertEqual(extractStrictAnswer(q.answerLetter, options: q.options), q.answerLetter)
    }
}
