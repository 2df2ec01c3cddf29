import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import XCTest
@testable import Models
@testable import TTRV

final class ReportTests: XCTestCase {
    /// Every `<svg …>…</svg>` in a page.
    static func svgs(_ html: String) -> [String] {
        var out: [String] = []
        var rest = html[...]
        while let start = rest.range(of: "<svg"), let end = rest.range(of: "</svg>", range: start.upperBound..<rest.endIndex) {
            out.append(String(rest[start.lowerBound..<end.upperBound]))
            rest = rest[end.upperBound...]
        }
        return out
    }

    /// Well-formed XML. On Linux, parse() recovers from errors and still returns true, so the
    /// recorded error is checked too.
    static func parses(_ xml: String) -> Bool {
        let parser = XMLParser(data: Data(xml.utf8))
        return parser.parse() && parser.parserError == nil
    }

    func testEverySVGIsWellFormedXML() throws {
        let dir = try SyntheticRun.tempDir("xml")
        defer { try? FileManager.default.removeItem(at: dir) }
        try SyntheticRun.write(to: dir.appendingPathComponent("a"), votes: 8)
        try SyntheticRun.write(to: dir.appendingPathComponent("b"), gain: -0.05, seed: 1, data: "a \"quoted\" <data> & more",
                               olderLog: true)
        let older = try RunFiles.load(dir.appendingPathComponent("b"))
        XCTAssertNil(older.steps[0].ratioMaxAbsLog)
        XCTAssertEqual(Self.svgs(HTMLReport.runPage(older)).count, 12, "no ratio chart for a log without the field")
        let run = try HTMLReport.runPage(RunFiles.load(dir.appendingPathComponent("a")))
        let comparison = Reports.comparisonPage(try ["a", "b"].map { try RunFiles.load(dir.appendingPathComponent($0)) })
        let eval = HTMLReport.evalPage(SyntheticRun.eval(SyntheticRun.predictions(12, votes: 4) { $0 % 3 == 0 }, votes: 4), name: "e.json")
        // accuracy, per class, 9 step charts (ratio present), 2 confusion matrices; 4 in the comparison; 2 for an eval.
        XCTAssertEqual(Self.svgs(run).count, 13)
        XCTAssertEqual(Self.svgs(comparison).count, 4)
        XCTAssertEqual(Self.svgs(eval).count, 2)
        for svg in Self.svgs(run) + Self.svgs(comparison) + Self.svgs(eval) {
            XCTAssertTrue(Self.parses(svg), "not well-formed XML: \(svg.prefix(300))")
        }
        // The check does reject the old, unquoted output and an unclosed element.
        XCTAssertFalse(Self.parses("<svg width=\"10\"><line x1=\"0\" y1=\"0\" x2=\"5\" y2=\"5\" stroke=#444/></svg>"))
        XCTAssertFalse(Self.parses("<svg><line></svg>"))
    }

    /// The page `ttrv adapt` writes, from its in-memory report (its StepLog has no ratio field).
    func testAdaptWritesAWellFormedPage() throws {
        let dir = try SyntheticRun.tempDir("write")
        defer { try? FileManager.default.removeItem(at: dir) }
        var r = try SyntheticRun.write(to: dir)
        r.accuracyAfterNorm = r.accuracyBefore + 0.1
        let before = try readJSON(EvalReport.self, dir.appendingPathComponent("eval_before.json"), what: "eval")
        let after = try readJSON(EvalReport.self, dir.appendingPathComponent("eval_after.json"), what: "eval")
        let url = dir.appendingPathComponent("report.html")
        try HTMLReport.write(r, before: before, after: after, to: url)
        let page = try String(contentsOf: url, encoding: .utf8)
        let svgs = Self.svgs(page)
        XCTAssertEqual(svgs.count, 13)
        for svg in svgs { XCTAssertTrue(Self.parses(svg)) }
        // The matching's and the RL steps' own shares of the gain.
        let norm = String(format: "%.1f%%", 100 * r.accuracyAfterNorm!)
        XCTAssertTrue(page.contains("after the matching alone: <b>\(norm)</b>"), "accuracy after the matching")
        XCTAssertTrue(page.contains("matching <span class=\"good\">+10.0 pt</span>"))
    }

    func testTicksAreNiceAndCoverTheRange() {
        XCTAssertEqual(Chart.ticks(0, 0.95), [0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0])
        XCTAssertEqual(Chart.ticks(1, 10, integers: true), [0, 2, 4, 6, 8, 10])
        XCTAssertEqual(Chart.ticks(1, 2, integers: true), [1, 2])
        XCTAssertEqual(Chart.ticks(-7, 12), [-10, -5, 0, 5, 10, 15])
        XCTAssertEqual(Chart.label(0.6000000000000001, step: 0.2), "0.6")
        XCTAssertEqual(Chart.label(2e-5, step: 1e-5), "2e-05")
        XCTAssertEqual(Chart.label(1e-17, step: 0.2), "0")
    }

    func testLineChartPlacesPointsOnTheAxes() throws {
        // x 1…3 on ticks [1, 2, 3]: x = 64 + (x - 1) / 2 · 380; y 0…1 on ticks 0…1, 6 px inside the
        // 198 px high plot area: y = 58 + 6 + 186 · (1 - v).
        let svg = Chart.lines(title: "t", xLabel: "step", yLabel: "v", x: [1, 2, 3], series: [.init("s", [0, 0.5, 1], color: "#123456")],
                              yFloor: 0, yCeiling: 1)
        XCTAssertTrue(svg.contains("points=\"64.0,250.0 254.0,157.0 444.0,64.0\""), svg)
        XCTAssertTrue(svg.contains(">step</text>") && svg.contains(">s</text>"))
    }

    func testPerClassAccuracyAndConfusionFromOptionsAndLabels() {
        // Items 0–3 right, 4–7 wrong (answer one option further on); item 8 invalid.
        var preds = SyntheticRun.predictions(8, votes: 0) { $0 < 4 }
        var invalid = SyntheticRun.predictions(9, votes: 0) { _ in false }[8]
        invalid.prediction = nil
        preds.append(invalid)
        let t = ClassTable(before: preds, after: nil)
        XCTAssertEqual(t.classes, ["T-shirt/top", "Trouser", "Pullover", "Dress"])
        XCTAssertEqual(t.predicted, ["T-shirt/top", "Trouser", "Pullover", "Dress", "(invalid)"])
        // Item i (class i % 4) has options rotated by i, so the next option is class (i + 1) % 4.
        XCTAssertEqual(t.before, [[1, 1, 0, 0, 1], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [1, 0, 0, 1, 0]])
        XCTAssertEqual(t.accuracy(t.before), [1.0 / 3, 0.5, 0.5, 0.5])
    }

    func testExamplesPutChangedItemsFirst() {
        let before = SyntheticRun.predictions(10, votes: 0) { $0 < 5 }
        let after = SyntheticRun.predictions(10, votes: 0) { $0 >= 3 && $0 < 7 }
        let picked = HTMLReport.pickExamples(before: before, after: after, limit: 4)
        // fixed: 5, 6; broken: 0, 1, 2; at most two of each first.
        XCTAssertEqual(picked.map { $0.0.id }, ["test-5", "test-6", "test-0", "test-1"])
        XCTAssertEqual(picked.map(\.2), ["fixed", "fixed", "broken", "broken"])
    }

    func testComparisonGroupsSeedsIntoMeanAndStd() throws {
        let dir = try SyntheticRun.tempDir("compare")
        defer { try? FileManager.default.removeItem(at: dir) }
        // Gains in points on 40 items: contrast 10, 15, 20 (mean 15, std 5); noise −5, 0, 5 (mean 0, std 5).
        for (k, g) in [0.1, 0.15, 0.2].enumerated() {
            try SyntheticRun.write(to: dir.appendingPathComponent("contrast-s\(k)"), gain: g, seed: UInt64(k))
        }
        for (k, g) in [-0.05, 0, 0.05].enumerated() {
            try SyntheticRun.write(to: dir.appendingPathComponent("noise-s\(k)"), gain: g, seed: UInt64(k),
                                   data: "fashion-mnist-c:gaussian_noise:3")
        }
        let inputs = ["contrast-s0", "contrast-s1", "contrast-s2", "noise-s0", "noise-s1", "noise-s2"].map { dir.appendingPathComponent($0).path }
        let files = try Reports.build(inputs: inputs, out: dir.appendingPathComponent("cmp.html").path)
        XCTAssertEqual(files.map(\.lastPathComponent), ["cmp.html", "cmp.csv"])
        let html = try String(contentsOf: files[0], encoding: .utf8)
        XCTAssertTrue(html.contains("<td>+15.0 ± 5.0</td>"), "contrast group")
        XCTAssertTrue(html.contains("<td>+0.0 ± 5.0</td>"), "noise group")
        XCTAssertTrue(html.contains("<code>data</code>, <code>seed</code>"), "differing settings")
        XCTAssertTrue(html.contains("<a href=\"noise-s2/report.html\">noise-s2</a>"), "relative link to the run's page")
        XCTAssertEqual(Reports.link(to: URL(fileURLWithPath: "/elsewhere/a b/report.html"), from: dir),
                       "file:///elsewhere/a%20b/report.html")
        let csv = try String(contentsOf: files[1], encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(csv.count, 7)
        XCTAssertEqual(csv[1], "contrast-s0,fashion-mnist-c:contrast:5,default,seed=0,50.0,60.0,+10.0,,,5.0,5.0,8,96,,fashion-mnist-c:contrast:5")
    }

    func testCSVFieldsAreQuoted() {
        XCTAssertEqual(Reports.csvField("plain"), "plain")
        XCTAssertEqual(Reports.csvField("a,b"), "\"a,b\"")
        XCTAssertEqual(Reports.csvField("say \"hi\""), "\"say \"\"hi\"\"\"")
    }

    func testBadInputsNameTheFile() throws {
        let dir = try SyntheticRun.tempDir("bad")
        defer { try? FileManager.default.removeItem(at: dir) }
        XCTAssertThrowsError(try Reports.build(inputs: [dir.appendingPathComponent("missing").path], out: nil)) {
            XCTAssertTrue("\($0)".contains("missing: no such file or directory"), "\($0)")
        }
        XCTAssertThrowsError(try Reports.build(inputs: [dir.path], out: nil)) {
            XCTAssertTrue("\($0)".contains("\(dir.path)/report.json: no such file"), "\($0)")
        }
        try SyntheticRun.write(to: dir)
        try "{\"step\": 0}\nnot json\n".write(to: dir.appendingPathComponent("adapt_log.jsonl"), atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try Reports.build(inputs: [dir.path], out: nil)) {
            XCTAssertTrue("\($0)".contains("adapt_log.jsonl: line 2 is not a step log entry"), "\($0)")
        }
        let eval = dir.appendingPathComponent("e.json")
        try "{\"dataset\": \"x\"}".write(to: eval, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try Reports.build(inputs: [eval.path], out: nil)) {
            XCTAssertTrue("\($0)".contains("e.json: not an eval report (`ttrv eval --json`) (missing \"model\""), "\($0)")
        }
    }

    func testOldEvalFilesWithoutReportFieldsStillLoad() throws {
        let old = #"{"dataset":"d","model":"m","items":1,"accuracy":1,"invalid_share":0,"votes":0,"seconds":1,"images_per_s":1,"#
            + #""predictions":[{"id":"x","answer":"A","response":"A","prediction":"A","correct":true}]}"#
        let e = try JSONDecoder().decode(EvalReport.self, from: Data(old.utf8))
        XCTAssertNil(e.predictions[0].options)
        let page = HTMLReport.evalPage(e, name: "old.json")
        XCTAssertTrue(page.contains("no image"))
        for svg in Self.svgs(page) { XCTAssertTrue(Self.parses(svg)) }
    }

    func testVoteHistogramCountsMostFirst() {
        XCTAssertEqual(VoteCount.histogram(["B", nil, "A", "A", nil, "A"]),
                       [VoteCount(answer: "A", count: 3), VoteCount(answer: nil, count: 2), VoteCount(answer: "B", count: 1)])
    }

    func testAdaptCommandReproducesTheOptions() {
        var o = AdaptOptions()
        o.loraRank = 8
        o.evalLimit = 40
        o.visionNorm = false
        o.train = [.projector, .lm]
        let r = AdaptReport(accuracyBefore: 0, accuracyAfter: 0, evalItems: 40, adaptItems: 20, steps: 1, seconds: 1,
                            dataset: "fashion-mnist-c:contrast:5", evalDataset: "fashion-mnist-c:contrast:5", model: "default",
                            mode: .default, stoppedEarly: nil, visionNorm: false, trainedParts: [.projector, .lm],
                            trainableParameters: 1, command: nil, options: o, log: [])
        XCTAssertEqual(HTMLReport.adaptCommand(r, out: "runs/my run"),
                       "ttrv adapt --model default --data fashion-mnist-c:contrast:5 --mode default --adapt-samples 20 --epochs 2 "
                       + "--batch-prompts 4 --votes 32 --train-samples 16 --lora-rank 8 --train projector,lm --reward frequency "
                       + "--entropy-coef 0.75 --max-new-tokens 8 --kl-coef 0.001 --eval-limit 40 --seed 0 --no-vision-norm "
                       + "--out 'runs/my run'")
        XCTAssertEqual(HTMLReport.optionFields(o).first { $0.0 == "train" }?.1, "projector,lm")
    }
}
