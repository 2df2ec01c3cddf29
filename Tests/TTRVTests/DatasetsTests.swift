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
