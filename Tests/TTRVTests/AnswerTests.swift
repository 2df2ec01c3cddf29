import XCTest
@testable import TTRV

final class AnswerTests: XCTestCase {
    // Expected values were checked against Python 3:
    // s = t.strip("\n").rstrip("./").strip(" ").lstrip(":").upper()
    // m = re.findall(r"\b(A|B|C|D)\b", s); m[-1] if m else s.rstrip("./")
    func testReferenceModeMatchesPythonExtractor() {
        let cases: [(String, String)] = [
            ("B", "B"),
            ("B, a cat", "A"),            // the quirk: "a" is upper-cased and is the last match
            ("<|im_end|>", "<|IM_END|>"), // an empty reply, decoded with special tokens kept
            ("B<|im_end|>", "B"),         // "<" is no word character, so B stands alone
            ("The answer is C.", "C"),
            ("c", "C"),
            ("A or B", "B"),              // last match, not first
            ("\n\nD./", "D"),
            ("\n C \n", "C"),             // newlines first, then the spaces they exposed
            (":b", "B"),
            (":yes.", "YES"),             // no letter: the stripped, upper-cased text
            ("ABC", "ABC"),
            ("dog.", "DOG"),
            ("Answer: B_", "ANSWER: B_"), // "_" is a word character
            ("B2", "B2"),
            ("B\u{00B2}", "B\u{00B2}"),   // superscript two is numeric, hence a word character
            ("B\u{00E9}", "B\u{00C9}"),   // é is a letter: no boundary after B
            ("Bß", "BSS"),                // full Unicode upper-casing, as Python's str.upper
        ]
        for (text, expected) in cases {
            XCTAssertEqual(extractAnswer(text, mode: .reference), expected, "\(text.debugDescription)")
        }
    }

    func testReferenceModeWorksOnCodePointsNotGraphemes() {
        // A combining accent is category Mn, not a word character in Python, so B still
        // stands alone; as one Swift Character "B́" it would not.
        XCTAssertEqual(extractReferenceAnswer("B\u{0301}"), "B")
        // "\r\n" is one Swift Character; Python's strip("\n") only removes the "\n".
        XCTAssertEqual(extractReferenceAnswer("C\r\nB"), "B")
        XCTAssertEqual(extractReferenceAnswer("yes\r\n"), "YES\r")
    }

    func testReferenceModeNeverInvalid() {
        XCTAssertEqual(extractAnswer("", mode: .reference), "")
        XCTAssertEqual(extractAnswer("   ", mode: .reference), "")
    }

    func testPythonWordCharacters() {
        XCTAssertTrue(isPythonWordScalar("_"))
        XCTAssertTrue(isPythonWordScalar("\u{4E00}"))   // CJK ideograph (Lo)
        XCTAssertTrue(isPythonWordScalar("\u{0663}"))   // Arabic-Indic three (Nd)
        XCTAssertTrue(isPythonWordScalar("\u{2167}"))   // Roman numeral eight (Nl)
        XCTAssertFalse(isPythonWordScalar("\u{0301}"))  // combining acute (Mn)
        XCTAssertFalse(isPythonWordScalar("-"))
        XCTAssertFalse(isPythonWordScalar("<"))
    }

    private let options = ["cat", "dog", "bird", "fish"]

    func testStrictModeAcceptsOneUnambiguousChoice() {
        let valid = [
            "B", "B.", "B)", "(B)", "B:", " B \n", "B<|im_end|>", "B\n<|im_end|>",
            "Answer: B", "answer:B", "ANSWER: (B)",
            "B. dog", "B) dog", "(B) dog", "B: dog", "B. dog.",
            "dog", "dog.", "Answer: dog",
        ]
        for text in valid {
            XCTAssertEqual(extractAnswer(text, mode: .strict(options: options)), "B", text.debugDescription)
        }
    }

    func testStrictModeRejectsEverythingElse() {
        let invalid = [
            "", "<|im_end|>", "b", "Dog", "E",
            "B, a cat",                     // letter plus text that is not its option text
            "B. cat",                       // option text of another letter
            "B or C", "B C", "BB", "B..",
            "The answer is B", "B. dog, because it barks",
            "Answer:", "(B", "[B]",
        ]
        for text in invalid {
            XCTAssertNil(extractAnswer(text, mode: .strict(options: options)), text.debugDescription)
        }
    }

    func testStrictModeLettersFollowTheOptionCount() {
        // MME yes/no is asked as A/B: C is no option there.
        XCTAssertEqual(extractStrictAnswer("B", options: ["yes", "no"]), "B")
        XCTAssertEqual(extractStrictAnswer("no", options: ["yes", "no"]), "B")
        XCTAssertNil(extractStrictAnswer("C", options: ["yes", "no"]))
        // Unknown options: letters A–D only, no texts.
        XCTAssertEqual(extractStrictAnswer("D.", options: []), "D")
        XCTAssertNil(extractStrictAnswer("E", options: []))
        XCTAssertNil(extractStrictAnswer("cat", options: []))
    }

    func testStrictModeOptionTextEdgeCases() {
        // Option texts ending in "." match with or without it.
        XCTAssertEqual(extractStrictAnswer("C. 3.5 m.", options: ["1 m.", "2 m.", "3.5 m.", "4 m."]), "C")
        XCTAssertEqual(extractStrictAnswer("3.5 m", options: ["1 m.", "2 m.", "3.5 m.", "4 m."]), "C")
        // A text listed twice names no single letter.
        XCTAssertNil(extractStrictAnswer("cat", options: ["cat", "dog", "cat", "fish"]))
        XCTAssertEqual(extractStrictAnswer("C", options: ["cat", "dog", "cat", "fish"]), "C")
    }

    func testOpenModeNormalisation() {
        let cases: [(String, String?)] = [
            ("Two dogs.", "2 dogs"),
            ("2 dogs", "2 dogs"),
            ("The answer is THREE!", "answer is 3"),
            ("A red car", "red car"),
            ("an apple", "apple"),
            ("3.5 meters", "3.5 meters"),   // a "." between digits is a decimal point
            ("Don't know", "dont know"),
            ("yes<|im_end|>", "yes"),
            ("  twenty\n", "20"),
            ("Stop sign", "stop sign"),
            ("   ", nil),
            ("<|im_end|>", nil),
            ("the.", nil),                  // only an article and punctuation
        ]
        for (text, expected) in cases {
            XCTAssertEqual(extractAnswer(text, mode: .open), expected, text.debugDescription)
        }
    }
}
