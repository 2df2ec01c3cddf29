import Foundation
import XCTest
@testable import Models
@testable import Torch
@testable import TTRV

/// The uneven items as a verl JSON file (images from the Qwen2.5-VL fixtures).
/// `openEnded`: "What is this?" answered "cat", so that every image offers every answer (the answer prior
/// then weighs the tiny models' free-text replies, which no option list contains).
func writeResumeRows(_ dir: URL, count: Int = 4, openEnded: Bool = false) throws -> URL {
    let images = fixtureDir.appendingPathComponent("qwen25vl")
    let items = unevenItems(images: images).items
    let rows = (0..<count).map { i -> [String: String] in
        let item = items[i % items.count]
        if openEnded {
            return ["prompt": "<image> \n What is this?", "answer": "cat", "id": "\(i)",
                    "image_path": images.appendingPathComponent(i % 2 == 0 ? "wide.png" : "tall.png").path]
        }
        return ["prompt": item.prompt, "image_path": images.appendingPathComponent(i % 2 == 0 ? "wide.png" : "tall.png").path,
                "answer": item.answer!, "id": "\(i)"]
    }
    let url = dir.appendingPathComponent("rows.json")
    try JSONSerialization.data(withJSONObject: rows).write(to: url)
    return url
}

/// `kill -9` during a run and the same command again: the run ends as an uninterrupted one does.
final class ResumeTests: XCTestCase {
    let ttrv = fixtureDir.deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent(".build/debug/ttrv")

    static let plain = ["--adapt-samples", "4", "--batch-prompts", "2", "--epochs", "5", "--max-new-tokens", "3"]

    func adapt(_ rows: URL, out: URL, settings: [String] = plain, model: URL? = nil) -> Process {
        let p = Process()
        p.executableURL = ttrv
        p.arguments = ["adapt", "--model", (model ?? fixtureDir.appendingPathComponent("qwen25vl")).path, "--data", rows.path,
                       "--mode", "reference"] + settings + ["--votes", "6", "--train-samples", "4", "--lr", "1e-3",
                       "--eval-limit", "4", "--threads", "1", "--out", out.path]
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        return p
    }

    func logLines(_ out: URL) -> Int {
        (try? String(contentsOf: out.appendingPathComponent("adapt_log.jsonl"), encoding: .utf8))?
            .split(separator: "\n").count ?? 0
    }

    /// Step logs without their timings (the only part a resumed run may not reproduce).
    func untimed(_ out: URL) throws -> [StepLog] {
        try String(contentsOf: out.appendingPathComponent("adapt_log.jsonl"), encoding: .utf8).split(separator: "\n").map {
            var l = try JSONDecoder().decode(StepLog.self, from: Data($0.utf8))
            (l.seconds, l.rolloutSeconds, l.oldRefSeconds, l.trainSeconds, l.optimizerSeconds) = (0, 0, 0, 0, 0)
            return l
        }
    }

    func testKilledRunResumesToTheSameResult() throws {
        try assertResumes(rows: 4, settings: Self.plain, killAfter: [2, 6], steps: 10)
    }

    /// The answer prior (which needs 8 images) is rebuilt from the logged votes: killed after step 5 (8 images
    /// seen), the rest of the run sees only 6 images again, so without the replay it would pay unweighted votes.
    /// The sharpened model's one-token replies repeat, so that the weights change rewards (measured: from step 3
    /// on the weighted run keeps several answers where the unweighted one settles on one).
    func testKilledRunResumesTheAnswerPrior() throws {
        let settings = ["--adapt-samples", "8", "--batch-prompts", "2", "--epochs", "2", "--answer-balance", "1",
                        "--max-new-tokens", "1"]
        try assertResumes(rows: 8, settings: settings, killAfter: [2, 5], steps: 8, sharpened: true)
    }

    func assertResumes(rows count: Int, settings: [String], killAfter points: [Int], steps: Int,
                       sharpened: Bool = false) throws {
        guard FileManager.default.fileExists(atPath: ttrv.path) else { return XCTFail("\(ttrv.path) is not built") }
        let dir = tempDir("resume")
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let rows = try writeResumeRows(dir, count: count, openEnded: sharpened)
        let model = sharpened ? try sharpenedTinyModel(in: dir, scale: 2) : nil
        let whole = dir.appendingPathComponent("whole"), killed = dir.appendingPathComponent("killed")
        let p = adapt(rows, out: whole, settings: settings, model: model)
        try p.run()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0)
        // Killed twice, at different points of the run, then finished by the same command.
        for killAfter in points {
            let k = adapt(rows, out: killed, settings: settings, model: model)
            try k.run()
            let deadline = Date().addingTimeInterval(300)
            while k.isRunning, logLines(killed) < killAfter, Date() < deadline { usleep(20_000) }
            XCTAssertTrue(k.isRunning, "the run ended before it could be killed")
            kill(k.processIdentifier, SIGKILL)
            k.waitUntilExit()
        }
        let last = adapt(rows, out: killed, settings: settings, model: model)
        try last.run()
        last.waitUntilExit()
        XCTAssertEqual(last.terminationStatus, 0)
        let a = try SafeTensorsFile(url: whole.appendingPathComponent("adapted.safetensors"))
        let b = try SafeTensorsFile(url: killed.appendingPathComponent("adapted.safetensors"))
        XCTAssertEqual(a.names, b.names)
        for name in a.names { XCTAssertTrue(try a.tensor(name).floats() == b.tensor(name).floats(), "\(name) differs") }
        XCTAssertEqual(try untimed(whole), try untimed(killed))
        let ra = try readJSON(AdaptReport.self, from: whole.appendingPathComponent("report.json"))
        let rb = try readJSON(AdaptReport.self, from: killed.appendingPathComponent("report.json"))
        XCTAssertEqual(ra.steps, steps)
        XCTAssertEqual([ra.accuracyBefore, ra.accuracyAfter], [rb.accuracyBefore, rb.accuracyAfter])
        XCTAssertEqual(try readJSON(EvalReport.self, from: whole.appendingPathComponent("eval_after.json")).predictions.map(\.response),
                       try readJSON(EvalReport.self, from: killed.appendingPathComponent("eval_after.json")).predictions.map(\.response))
    }

    /// A collapse-guard stop restores the last good weights (here: the start, as the first step already
    /// trips it) and the run ends there, also when the command runs again.
    func testGuardStopRestoresTheLastGoodWeights() throws {
        let dir = fixtureDir.appendingPathComponent("qwen25vl")
        let data = unevenItems(images: dir)
        var o = smallOptions(train: [.lm, .projector])
        o.mode = .default
        o.batchPrompts = 2
        o.adaptSamples = 4
        o.epochs = 2
        let out = tempDir("guard")
        defer { try? FileManager.default.removeItem(at: out) }
        for attempt in 0..<2 {
            let vlm = try ModelRegistry.load(dir.path)
            let start = try vlm.parameters(of: [.lm, .projector]).map { try $0.tensor.floats() }
            let adapter = try Adapter(vlm: vlm, options: o, out: out, log: { _ in })
            var t = CollapseGuard.Thresholds()
            (t.invalidShare, t.rise, t.invalidPatience) = (-1, -1, 1) // every step looks collapsed
            adapter.guardThresholds = t
            let r = try adapter.run(adaptData: data, evalData: data, modelName: "tiny")
            XCTAssertNotNil(r.stoppedEarly, "attempt \(attempt)")
            XCTAssertEqual(r.steps, 1, "attempt \(attempt): stopped after the first step")
            let end = try vlm.parameters(of: [.lm, .projector]).map { try $0.tensor.floats() }
            XCTAssertTrue(start == end, "attempt \(attempt): weights restored to the start")
        }
    }

    /// A drifted policy is caught by the KL measured at the next step's start: the weights of the last
    /// "good" step are the drifted ones, so the run goes back to the start, not to them. (The default VLM:
    /// a random tiny model answers nothing valid in default mode, so nothing would train.)
    func testPolicyDriftRestoresTheStartNotTheLastGoodStep() throws {
        let data = try Dataset.open("fashion-mnist-c:contrast:5")
        let items = Dataset(name: data.name, items: Array(data.items.prefix(4)))
        var o = smallOptions(votes: 4)
        o.mode = .default
        o.visionNorm = false
        o.maxNewTokens = 3
        o.batchPrompts = 2
        o.evalLimit = 2
        o.epochs = 2
        o.lr = 1e-3
        let out = tempDir("drift")
        defer { try? FileManager.default.removeItem(at: out) }
        let vlm = try ModelRegistry.load("default")
        let trained = { try vlm.parameters(of: vlm.defaultTrainedParts).map { try $0.tensor.floats() } }
        let start = try trained()
        let adapter = try Adapter(vlm: vlm, options: o, out: out, log: { _ in })
        adapter.guardThresholds.maxKL = 1e-9  // step 0 (KL exactly 0) passes; any movement after it stops the run
        let r = try adapter.run(adaptData: items, evalData: items, modelName: "default")
        XCTAssertLessThan(r.steps, 4, "stopped early")
        XCTAssertTrue(r.stoppedEarly?.contains("policyDrift") == true, "\(r.stoppedEarly ?? "no stop")")
        XCTAssertTrue(try trained() == start)
    }
}
