import XCTest
@testable import TTRV

final class DatasetFileTests: XCTestCase {
    private let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures/ttrv")

    private var scratch: URL!

    override func setUpWithError() throws {
        scratch = FileManager.default.temporaryDirectory
            .appendingPathComponent("ttrv-dataset-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: scratch)
    }

    private func write(_ name: String, _ text: String) throws -> URL {
        let url = scratch.appendingPathComponent(name)
        try text.write(to: url, atomically: true, encoding: .utf8)
        return url
    }

    private func loadError(_ url: URL) -> DatasetFileError? {
        do {
            _ = try DatasetFile.load(url)
            return nil
        } catch {
            return error as? DatasetFileError
        }
    }

    func testJSONList() throws {
        let items = try DatasetFile.load(fixtures.appendingPathComponent("rows.json"))
        XCTAssertEqual(items.count, 2)
        XCTAssertEqual(items[0].id, "120")
        XCTAssertTrue(items[0].prompt.hasPrefix("<image> \n Look at the given image"))
        XCTAssertEqual(items[0].answer, "B")
        XCTAssertEqual(items[0].options, ["tench", "king_penguin", "goldfish", "tabby"])
        // Relative to the file's folder.
        XCTAssertEqual(items[0].imagePath?.path, fixtures.appendingPathComponent("images/penguin.jpg").path)

        XCTAssertEqual(items[1].id, "7")          // a number id, not "7.0"
        XCTAssertNil(items[1].answer)
        XCTAssertNil(items[1].options)
        XCTAssertEqual(items[1].imagePath?.path, "/data/abs/dog.png")
    }

    func testJSONLinesWithImagesListAndChatPrompt() throws {
        let items = try DatasetFile.load(fixtures.appendingPathComponent("rows.jsonl"))
        XCTAssertEqual(items.count, 2)             // the blank line is skipped
        XCTAssertEqual(items[0].id, "3")
        XCTAssertEqual(items[0].options, ["the circle", "the square", "equal"])
        XCTAssertEqual(items[0].imagePath?.path, fixtures.appendingPathComponent("img/shapes.png").path)
        // No id: the 0-based row index. A numeric answer becomes its JSON text.
        XCTAssertEqual(items[1].id, "1")
        XCTAssertEqual(items[1].answer, "2")
        XCTAssertEqual(items[1].prompt, "<image> How many dogs?")
        XCTAssertEqual(items[1].imagePath?.path,
                       fixtures.deletingLastPathComponent().appendingPathComponent("dogs.jpg").path)
    }

    func testCRLFLines() throws {
        let url = try write("crlf.jsonl", "{\"prompt\": \"p1\", \"id\": \"a\"}\r\n{\"prompt\": \"p2\", \"id\": \"b\"}\r\n")
        XCTAssertEqual(try DatasetFile.load(url).map(\.id), ["a", "b"])
    }

    func testInvalidJSONLineIsNamed() throws {
        let url = try write("bad.jsonl", "{\"prompt\": \"ok\"}\n\n{\"prompt\": \"cut off\"\n")
        let error = try XCTUnwrap(loadError(url))
        XCTAssertEqual(error.location, "line 3")
        XCTAssertTrue(error.message.hasPrefix("invalid JSON"), error.message)
        XCTAssertTrue(error.description.hasPrefix("\(url.path): line 3: invalid JSON"), error.description)
    }

    func testInvalidJSONListIsNamed() throws {
        let url = try write("bad.json", "[\n {\"prompt\": \"ok\"},\n {\"prompt\": oops}\n]\n")
        let error = try XCTUnwrap(loadError(url))
        XCTAssertEqual(error.file, url.path)
        XCTAssertTrue(error.message.hasPrefix("invalid JSON"), error.message)
        // Foundation reports the byte offset of "oops", which is on the third line.
        XCTAssertEqual(error.location, "line 3")
    }

    func testMissingPromptNamesTheRow() throws {
        let list = try write("rows.json", "[{\"prompt\": \"a\"}, {\"image_path\": \"x.jpg\", \"id\": 2}]")
        XCTAssertEqual(loadError(list)?.description, "\(list.path): row 2: missing \"prompt\"")
        let lines = try write("rows.jsonl", "{\"prompt\": \"a\"}\n{\"prompt\": null}\n")
        XCTAssertEqual(loadError(lines)?.description, "\(lines.path): line 2: missing \"prompt\"")
    }

    func testWrongTypesAreErrors() throws {
        let cases = [
            ("[1]", "expected a JSON object"),
            ("[{\"prompt\": 5}]", "\"prompt\" must be a string or a chat list with a user message"),
            ("[{\"prompt\": \"p\", \"id\": true}]", "\"id\" must be a string or a number"),
            ("[{\"prompt\": \"p\", \"answer\": [\"A\"]}]", "\"answer\" must be a string or a number"),
            ("[{\"prompt\": \"p\", \"image_path\": 3}]", "\"image_path\" must be a non-empty string"),
            ("[{\"prompt\": \"p\", \"images\": [\"a.jpg\", \"b.jpg\"]}]", "\"images\" must be a list of exactly one image"),
        ]
        for (i, (text, message)) in cases.enumerated() {
            let error = loadError(try write("case\(i).json", text))
            XCTAssertEqual(error?.location, "row 1", text)
            XCTAssertEqual(error?.message, message, text)
        }
    }

    func testFileLevelErrors() throws {
        XCTAssertEqual(loadError(try write("empty.jsonl", "\n \n"))?.message, "no rows")
        XCTAssertEqual(loadError(try write("emptylist.json", "[]"))?.message, "no rows")
        let missing = scratch.appendingPathComponent("absent.json")
        let error = try XCTUnwrap(loadError(missing))
        XCTAssertEqual(error.file, missing.path)
        XCTAssertNil(error.location)
        XCTAssertTrue(error.message.hasPrefix("cannot read file"), error.message)
    }

    func testParseOptionsForms() {
        XCTAssertEqual(parseOptions("Q?\nOptions:\nA. red\nB. blue\nAnswer with the letter."), ["red", "blue"])
        XCTAssertEqual(parseOptions("Hint: x\nChoices:\n(A) 1\n(B) 2\n(C) 3"), ["1", "2", "3"])
        XCTAssertEqual(parseOptions("Choices:\nA:12\nB:15"), ["12", "15"])
        // Letters must run A, B, C… in order; a gap ends the list.
        XCTAssertEqual(parseOptions("Options:\nA. x\nC. y\nD. z"), nil)
        XCTAssertEqual(parseOptions("Options:\nA. x\nB. y\nD. z"), ["x", "y"])
        XCTAssertNil(parseOptions("What is shown? A. cat B. dog"))
        // The last block counts: an example block in the instructions is not the question's.
        XCTAssertEqual(parseOptions("Options:\nA. e1\nB. e2\nNow:\nOptions:\nA. real\nB. also"), ["real", "also"])
    }
}
