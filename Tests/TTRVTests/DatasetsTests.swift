import Foundation
import XCTest
@testable import Models
@testable import TTRV

final class DatasetsTests: XCTestCase {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    func testFashionMNISTAsMultipleChoice() throws {
        guard FileManager.default.fileExists(atPath: "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") else {
            throw XCTSkip("dataset-fashion-mnist not installed")
        }
        let ds = try Dataset.open("fashion-mnist:test", seed: 0, root: root)
        XCTAssertEqual(ds.items.count, 10_000)
        let again = try Dataset.open("fashion-mnist:test", seed: 0, root: root)
        var letters: [String: Int] = [:]
        for (a, b) in zip(ds.items.prefix(2000), again.items.prefix(2000)) {
            XCTAssertEqual(a.prompt, b.prompt, "the same options every run")
            let options = try XCTUnwrap(a.options)
            XCTAssertEqual(options.count, 4)
            XCTAssertEqual(Set(options).count, 4)
            let letter = try XCTUnwrap(a.answer)
            XCTAssertEqual(options[Int(letter.unicodeScalars.first!.value) - 65], a.label, "the answer letter names the true class")
            XCTAssertTrue(a.prompt.hasPrefix("<image> \n Look at the given image and identify what it shows."))
            XCTAssertEqual(parseOptions(a.prompt), options)
            letters[letter, default: 0] += 1
        }
        XCTAssertTrue(letters.values.allSatisfy { (400...600).contains($0) }, "correct letters roughly uniform: \(letters)")
        // first test image of Fashion-MNIST is an ankle boot (label 9)
        XCTAssertEqual(ds.items[0].label, "Ankle boot")
        if case .memory(let img)? = ds.items[0].image { XCTAssertEqual(img.width, 28) } else { XCTFail("in-memory image") }
    }

    func testShiftedSpecIsSeededAndValidated() throws {
        guard FileManager.default.fileExists(atPath: "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz") else {
            throw XCTSkip("dataset-fashion-mnist not installed")
        }
        let a = try Dataset.open("fashion-mnist-c:gaussian_noise:3", seed: 1, root: root)
        let b = try Dataset.open("fashion-mnist-c:gaussian_noise:3", seed: 1, root: root)
        let clean = try Dataset.open("fashion-mnist:test", seed: 1, root: root)
        guard case .memory(let x)? = a.items[5].image, case .memory(let y)? = b.items[5].image, case .memory(let z)? = clean.items[5].image else {
            return XCTFail("in-memory images")
        }
        XCTAssertEqual(x, y)
        XCTAssertNotEqual(x, z)
        XCTAssertEqual(a.items[5].answer, clean.items[5].answer, "a shift changes the image, not the question")
        for bad in ["fashion-mnist-c:fog:3", "fashion-mnist-c:gaussian_noise:6", "fashion-mnist:val", "nope:1"] {
            XCTAssertThrowsError(try Dataset.open(bad, root: root), bad) { XCTAssertTrue("\($0)".contains(bad), "\($0)") }
        }
    }

    func testEasyVQAAsMultipleChoiceOverSameTypeAnswers() throws {
        let q = root.appendingPathComponent(".deps/pkgs/easy-vqa/easy_vqa/data/test/questions.json")
        guard FileManager.default.fileExists(atPath: q.path) else { throw XCTSkip("easy-vqa not installed") }
        let ds = try Dataset.open("easy-vqa:test", root: root)
        XCTAssertGreaterThan(ds.items.count, 1000)
        for item in ds.items.prefix(300) {
            let options = try XCTUnwrap(item.options)
            let label = try XCTUnwrap(item.label)
            XCTAssertTrue(options.contains(label))
            let expected = ["yes", "no"].contains(label) ? 2 : ["circle", "rectangle", "triangle"].contains(label) ? 3 : 4
            XCTAssertEqual(options.count, expected, item.prompt)
            XCTAssertEqual(extractAnswer(item.answer!, mode: item.answerMode), item.answer)
            if case .file(let url)? = item.image { XCTAssertTrue(FileManager.default.fileExists(atPath: url.path), url.path) }
        }
    }

    func testShiftedEasyVQAKeepsTheQuestionsAndShiftsEachImageOnce() throws {
        let q = root.appendingPathComponent(".deps/pkgs/easy-vqa/easy_vqa/data/test/questions.json")
        guard FileManager.default.fileExists(atPath: q.path) else { throw XCTSkip("easy-vqa not installed") }
        let clean = try Dataset.open("easy-vqa:test", seed: 2, root: root)
        let shifted = try Dataset.open("easy-vqa-c:gaussian_noise:3", seed: 2, root: root)
        XCTAssertEqual(shifted.name, "easy-vqa-c:gaussian_noise:3")
        XCTAssertEqual(shifted.items.map(\.prompt), clean.items.map(\.prompt))
        XCTAssertEqual(shifted.items.map(\.answer), clean.items.map(\.answer))
        // Items 0 and 1 ask about image 0; item 0 and the first item about another image differ.
        guard case .file(let url0)? = clean.items[0].image, case .file(let url1)? = clean.items[1].image else {
            return XCTFail("clean easy-VQA images are files")
        }
        XCTAssertEqual(url0, url1)
        let other = try XCTUnwrap(clean.items.firstIndex { if case .file(let u)? = $0.image { return u != url0 }; return false })
        let a = try XCTUnwrap(shifted.items[0].image).load(), b = try XCTUnwrap(shifted.items[1].image).load()
        XCTAssertEqual(a, b, "every question about an image sees the same shifted copy")
        XCTAssertEqual(a, try XCTUnwrap(try Dataset.open("easy-vqa-c:gaussian_noise:3", seed: 2, root: root).items[0].image).load())
        let original = try XCTUnwrap(clean.items[0].image).load()
        XCTAssertEqual([a.width, a.height, a.channels], [original.width, original.height, original.channels])
        XCTAssertNotEqual(a, original)
        XCTAssertNotEqual(try XCTUnwrap(shifted.items[other].image).load(), try XCTUnwrap(clean.items[other].image).load())
        for bad in ["easy-vqa-c:fog:3", "easy-vqa-c:contrast:0", "easy-vqa-c:contrast"] {
            XCTAssertThrowsError(try Dataset.open(bad, root: root), bad) { XCTAssertTrue("\($0)".contains(bad), "\($0)") }
        }
    }

    func testCommaJoinedSpecsInterleaveTheirItems() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("mix-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        func write(_ name: String, _ n: Int) throws -> String {
            let rows = (0..<n).map { #"{"prompt": "q\#($0)", "answer": "A", "id": "\#($0)"}"# }
            try rows.joined(separator: "\n").write(to: dir.appendingPathComponent(name), atomically: true, encoding: .utf8)
            return dir.appendingPathComponent(name).path
        }
        let a = try write("a.jsonl", 3), b = try write("b.jsonl", 1)
        let mix = try Dataset.open("\(a),\(b)", root: root)
        XCTAssertEqual(mix.items.map(\.prompt), ["q0", "q0", "q1", "q2"])
        XCTAssertEqual(mix.items.map(\.id), ["a.jsonl/0", "b.jsonl/0", "a.jsonl/1", "a.jsonl/2"])
        XCTAssertEqual(mix.name, "a.jsonl,b.jsonl")
        XCTAssertThrowsError(try Dataset.open("\(a),nope:1", root: root)) { XCTAssertTrue("\($0)".contains("nope:1"), "\($0)") }
        XCTAssertThrowsError(try Dataset.open("\(a),", root: root))
    }

    func testJSONLFileWithRelativeImagePaths() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ds-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let row = #"{"prompt": "<image> \n Which? \n Options:\nA. cat\nB. dog", "image_path": "img/1.png", "answer": "B", "id": 7}"#
        try Data((row + "\n").utf8).write(to: dir.appendingPathComponent("d.jsonl"))
        let ds = try Dataset.open(dir.appendingPathComponent("d.jsonl").path)
        XCTAssertEqual(ds.items.first?.id, "7")
        XCTAssertEqual(ds.items.first?.options, ["cat", "dog"])
        if case .file(let url)? = ds.items.first?.image { XCTAssertEqual(url.path, dir.appendingPathComponent("img/1.png").path) } else { XCTFail() }
        XCTAssertThrowsError(try ds.items[0].image!.load()) { XCTAssertTrue("\($0)".contains("1.png"), "\($0)") }
    }
}
