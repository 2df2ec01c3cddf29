import Foundation
import XCTest
@testable import TTRV
import Torch

/// Multi-process runs of the built `ttrv` binary on loopback (and across two network namespaces
/// where permitted): `ttrv launch`, data-parallel eval, a peer dying mid-collective, the bench helper.
final class DistributedLaunchTests: XCTestCase {
    let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures")

    func ttrv() throws -> String { try builtTTRV() }

    func testEvalUnderLaunchMatchesOneProcess() throws {
        let tmp = try temporaryDirectory()
        let model = fixtures.appendingPathComponent("qwen25vl")
        // 7 items in batches of 2: rank 0 evaluates batches 0, 2 (items 0-1, 4-5), rank 1 batches 1, 3.
        let images = ["wide", "wide", "tall", "wide", "tall", "tall", "wide"]
        let rows = images.enumerated().map { i, name in
            "{\"id\": \"item\(i)\", \"prompt\": \"<image>\\nWhat animal is this?\\nA. cat\\nB. dog\\nC. bird\\nD. fish\", "
                + "\"image_path\": \"\(model.appendingPathComponent(name + ".png").path)\", \"answer\": \"\(["A", "B"][i % 2])\"}"
        }
        let data = tmp.appendingPathComponent("d.jsonl")
        try rows.joined(separator: "\n").write(to: data, atomically: true, encoding: .utf8)
        let eval = ["eval", "--model", model.path, "--data", data.path, "--max-tokens", "3", "--batch-size", "2",
                    "--votes", "2"]
        let one = tmp.appendingPathComponent("one.json"), two = tmp.appendingPathComponent("two.json")
        let output = try runAloneAndLaunched(eval, single: ["--json", one.path], launched: ["--json", two.path],
                                             launchTimeout: 60, wait: 120)
        let a = try JSONDecoder().decode(EvalReport.self, from: Data(contentsOf: one))
        let b = try JSONDecoder().decode(EvalReport.self, from: Data(contentsOf: two))
        XCTAssertEqual(b.predictions.map(\.id), (0..<7).map { "item\($0)" })
        let enc = JSONEncoder()
        enc.outputFormatting = .sortedKeys
        XCTAssertEqual(String(decoding: try enc.encode(a.predictions), as: UTF8.self),
                       String(decoding: try enc.encode(b.predictions), as: UTF8.self))
        XCTAssertEqual([a.accuracy, a.invalidShare, a.majAccuracy, a.passAtN], [b.accuracy, b.invalidShare, b.majAccuracy, b.passAtN])
        XCTAssertTrue(output.contains("[rank 1] [eval] 3/3"), output)
    }

    func testPeerKilledMidCollectiveFailsTheOtherQuickly() throws {
        let port = try StoreServer(port: 0, timeout: 5).port // free now that the server is gone
        let env = ["WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "\(port)", "TTRV_DIST_TIMEOUT": "60"]
        let bench = ["dist-bench", "--floats", "100000", "--iterations", "100000000", "--threads", "1"]
        let rank0 = try Child(try ttrv(), bench, env: env.merging(["RANK": "0"]) { $1 })
        let rank1 = try Child(try ttrv(), bench, env: env.merging(["RANK": "1"]) { $1 })
        defer { [rank0, rank1].forEach { $0.kill() } }
        XCTAssertTrue(rank0.waitFor("rank 0 of 2 connected", timeout: 60), rank0.output.value)
        XCTAssertTrue(rank1.waitFor("rank 1 of 2 connected", timeout: 60), rank1.output.value)
        Thread.sleep(forTimeInterval: 0.5)
        rank1.kill(SIGKILL)
        let killed = Date()
        XCTAssertTrue(rank0.wait(timeout: 30), "rank 0 kept running after its peer died")
        XCTAssertLessThan(Date().timeIntervalSince(killed), 15, "detected long before the 60 s deadline")
        XCTAssertNotEqual(rank0.status, 0)
        let out = rank0.output.value
        XCTAssertTrue(out.contains("Error: distributed") && out.contains("(rank 0 of 2)"), out)
    }

    func testLaunchStopsAllWorkersWhenOneDies() throws {
        let launcher = try Child(try ttrv(), ["launch", "--nproc", "2", "--threads", "1", "--", "dist-bench",
                                              "--floats", "100000", "--iterations", "100000000"])
        defer { launcher.kill() }
        XCTAssertTrue(launcher.waitFor("rank 1 of 2 connected", timeout: 60), launcher.output.value)
        XCTAssertTrue(launcher.waitFor("rank 0 of 2 connected", timeout: 60), launcher.output.value)
        let workers = childProcesses(of: launcher.process.processIdentifier)
        XCTAssertEqual(workers.count, 2)
        guard let victim = workers.first(where: { environment(of: $0)["RANK"] == "1" }) else {
            return XCTFail("no worker with RANK=1 among \(workers)")
        }
        Foundation.kill(victim, SIGKILL)
        XCTAssertTrue(launcher.wait(timeout: 30), "launcher kept running")
        XCTAssertEqual(launcher.status, 1)
        XCTAssertTrue(launcher.output.value.contains("launch: rank 1 was killed by signal 9"), launcher.output.value)
        for w in workers { XCTAssertNotEqual(Foundation.kill(w, 0), 0, "worker \(w) still alive") }
    }

    func testWorkerGivesUpWhenNoMasterAnswers() throws {
        let start = Date()
        // Node 1 of 2, and node 0 never comes (port 1 refuses every connection).
        let node1 = try Child(try ttrv(), ["launch", "--nnodes", "2", "--node-rank", "1", "--nproc", "1",
                                           "--master", "127.0.0.1:1", "--timeout", "3", "--", "dist-bench"])
        defer { node1.kill() }
        XCTAssertTrue(node1.wait(timeout: 30), "node 1 kept waiting")
        XCTAssertLessThan(Date().timeIntervalSince(start), 20)
        XCTAssertEqual(node1.status, 1)
        let out = node1.output.value
        XCTAssertTrue(out.contains("[rank 1] Error: distributed rendezvous: rank 1: store: no store answered at 127.0.0.1:1 within 3 s"), out)
        XCTAssertTrue(out.contains("launch: rank 1 exited with status 1"), out)
    }

    func testLaunchForwardsSIGTERMToWorkers() throws {
        let launcher = try Child(try ttrv(), ["launch", "--nproc", "2", "--threads", "1", "--", "dist-bench",
                                              "--floats", "1000", "--iterations", "100000000"])
        defer { launcher.kill() }
        XCTAssertTrue(launcher.waitFor("rank 1 of 2 connected", timeout: 60), launcher.output.value)
        XCTAssertTrue(launcher.waitFor("rank 0 of 2 connected", timeout: 60), launcher.output.value)
        let workers = childProcesses(of: launcher.process.processIdentifier)
        launcher.kill(SIGTERM)
        XCTAssertTrue(launcher.wait(timeout: 30), "launcher kept running")
        XCTAssertEqual(launcher.status, 1)
        XCTAssertTrue(launcher.output.value.contains("was killed by signal 15"), launcher.output.value)
        for w in workers { XCTAssertNotEqual(Foundation.kill(w, 0), 0, "worker \(w) still alive") }
    }

    func testBenchHelperTimesTwoProcessAllreduce() throws {
        let s = try Bench.twoProcessAllreduceSeconds(executable: try ttrv(), floats: 10000, iterations: 3)
        XCTAssertGreaterThan(s, 0)
        XCTAssertLessThan(s, 10)
    }

    func testInterleaveBatchesRestoresDatasetOrder() throws {
        // Batches of sizes 2, 2, 2, 1 over 2 ranks: rank 0 had batches 0 and 2, rank 1 batches 1 and 3.
        XCTAssertEqual(try interleaveBatches([[0, 1, 4, 5], [2, 3, 6]], sizes: [2, 2, 2, 1]), [0, 1, 2, 3, 4, 5, 6])
        XCTAssertEqual(try interleaveBatches([[0, 1], [], []], sizes: [2]), [0, 1])
        XCTAssertThrowsError(try interleaveBatches([[0, 1, 4], [2, 3, 6]], sizes: [2, 2, 2, 1])) { e in
            XCTAssertTrue("\(e)".contains("rank 0 sent 3 predictions, expected 4"), "\(e)")
        }
    }

    /// Two network namespaces joined by a veth pair act as two hosts; one `ttrv launch` in each
    /// forms a 2-node job. Skipped where creating namespaces is not permitted.
    func testTwoHostsOverNetworkNamespaces() throws {
        let exe = try ttrv()
        guard let ipTool = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].first(where: {
            FileManager.default.isExecutableFile(atPath: $0)
        }) else { throw XCTSkip("no `ip` tool (iproute2) for network namespaces") }
        let tag = "\(getpid() % 100000)"
        let ns = ["ttrv\(tag)a", "ttrv\(tag)b"], veth = ["tv\(tag)a", "tv\(tag)b"], ip = ["10.213.0.1", "10.213.0.2"]
        defer { ns.forEach { _ = try? sh([ipTool, "netns", "del", $0]) } }
        var setup: [[String]] = ns.map { [ipTool, "netns", "add", $0] }
        setup.append([ipTool, "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]])
        for i in 0..<2 {
            setup.append([ipTool, "link", "set", veth[i], "netns", ns[i]])
            setup.append([ipTool, "-n", ns[i], "addr", "add", "\(ip[i])/24", "dev", veth[i]])
            setup.append([ipTool, "-n", ns[i], "link", "set", veth[i], "up"])
            setup.append([ipTool, "-n", ns[i], "link", "set", "lo", "up"])
            setup.append([ipTool, "netns", "exec", ns[i], "/bin/true"])
        }
        for cmd in setup {
            let (status, out) = try sh(cmd)
            if status != 0 { throw XCTSkip("network namespaces not available here (\(cmd.joined(separator: " ")): \(out))") }
        }
        let nodes = try (0..<2).map { i in
            try Child(ipTool, ["netns", "exec", ns[i], exe, "launch", "--nnodes", "2", "--node-rank", "\(i)",
                                       "--nproc", "1", "--threads", "1", "--master", "\(ip[0]):29517", "--timeout", "30",
                                       "--", "dist-bench", "--floats", "1000", "--iterations", "3"])
        }
        defer { nodes.forEach { $0.kill() } }
        for (i, node) in nodes.enumerated() {
            XCTAssertTrue(node.wait(timeout: 60), "node \(i) did not finish")
            XCTAssertEqual(node.status, 0, node.output.value)
        }
        XCTAssertTrue(nodes[0].output.value.contains("[rank 0] allreduce of 1000 floats across 2 processes"), nodes[0].output.value)
        XCTAssertTrue(nodes[1].output.value.contains("[rank 1] dist-bench: rank 1 of 2 connected"), nodes[1].output.value)
    }

    // MARK: helpers

    func temporaryDirectory() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("ttrv-dist-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: url) }
        return url
    }

    func sh(_ args: [String]) throws -> (Int32, String) {
        let c = try Child(args[0], Array(args.dropFirst()))
        _ = c.wait(timeout: 30)
        return (c.status, c.output.value)
    }


    func environment(of pid: Int32) -> [String: String] {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/environ") else { return [:] }
        let pairs = data.split(separator: 0).compactMap { entry -> (String, String)? in
            let s = String(decoding: entry, as: UTF8.self)
            guard let eq = s.firstIndex(of: "=") else { return nil }
            return (String(s[..<eq]), String(s[s.index(after: eq)...]))
        }
        return Dictionary(pairs) { a, _ in a }
    }
}

/// Runs a ttrv command as one process (with `single` appended) and as a 2-process `ttrv launch` job (with
/// `launched` appended); both must finish within `wait` seconds and succeed. Returns the job's output.
@discardableResult
func runAloneAndLaunched(_ args: [String], single: [String], launched: [String], launchTimeout: Int,
                         wait: Double) throws -> String {
    let one = try Child(try builtTTRV(), args + ["--threads", "1"] + single)
    XCTAssertTrue(one.wait(timeout: wait), "\(args[0]) as one process did not finish")
    XCTAssertEqual(one.status, 0, one.output.value)
    let job = try Child(try builtTTRV(), ["launch", "--nproc", "2", "--threads", "1", "--timeout", "\(launchTimeout)", "--"]
                        + args + launched)
    XCTAssertTrue(job.wait(timeout: wait), "launched \(args[0]) did not finish")
    XCTAssertEqual(job.status, 0, job.output.value)
    return job.output.value
}

/// The largest absolute difference between the same-named tensors of two safetensors files.
func largestDifference(_ a: URL, _ b: URL) throws -> Double {
    let fa = try SafeTensorsFile(url: a), fb = try SafeTensorsFile(url: b)
    XCTAssertEqual(fa.names, fb.names)
    return try fa.names.reduce(0.0) { max($0, try (fa.tensor($1) - fb.tensor($1)).abs().max().item()) }
}

/// The ttrv binary next to this test bundle (`swift build --build-tests` builds both).
func builtTTRV() throws -> String {
    let dir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
    let exe = dir.appendingPathComponent("ttrv").path
    guard FileManager.default.isExecutableFile(atPath: exe) else {
        throw XCTSkip("no ttrv binary at \(exe): run `swift build --build-tests` first")
    }
    return exe
}

/// Process ids whose parent is `pid` (from /proc/*/stat).
func childProcesses(of pid: Int32) -> [Int32] {
    let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
    return entries.compactMap { Int32($0) }.filter { p in
        guard let stat = try? String(contentsOfFile: "/proc/\(p)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 1 && Int32(fields[1]) == pid
    }
}

/// A child process whose stdout and stderr are collected together.
final class Child: @unchecked Sendable {
    let process = Process()
    let output = Locked<String>("")
    let closed = Locked(false)

    init(_ exe: String, _ args: [String], env: [String: String] = [:]) throws {
        process.executableURL = URL(fileURLWithPath: exe)
        process.arguments = args
        process.environment = ProcessInfo.processInfo.environment.merging(env) { $1 }
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        Thread { [output, closed] in
            while true {
                let d = pipe.fileHandleForReading.availableData
                if d.isEmpty { break }
                output.update { $0 += String(decoding: d, as: UTF8.self) }
            }
            closed.update { $0 = true }
        }.start()
    }

    var status: Int32 { process.isRunning ? -1 : process.terminationStatus }

    func waitFor(_ text: String, timeout: Double) -> Bool {
        poll(timeout) { self.output.value.contains(text) || !self.process.isRunning } && output.value.contains(text)
    }

    func wait(timeout: Double) -> Bool {
        poll(timeout) { !self.process.isRunning && self.closed.value }
    }

    func kill(_ sig: Int32 = SIGKILL) {
        if process.isRunning { Foundation.kill(process.processIdentifier, sig) }
    }

    private func poll(_ timeout: Double, _ done: () -> Bool) -> Bool {
        let end = Date().addingTimeInterval(timeout)
        while Date() < end {
            if done() { return true }
            Thread.sleep(forTimeInterval: 0.05)
        }
        return done()
    }
}

/// Data-parallel adaptation: 2 processes × 2 prompts per step end where 1 process × 4 prompts does, and a
/// killed worker stops the job, which then resumes from its checkpoint.
final class DistributedAdaptTests: XCTestCase {
    func ttrv() throws -> String { try builtTTRV() }


    func adaptArguments(_ rows: URL, model: URL, epochs: Int = 3, samples: Int = 4) -> [String] {
        ["adapt", "--model", model.path, "--data", rows.path, "--mode", "reference",
         "--advantage", "batch", "--mini-batch-prompts", "4", "--adapt-samples", "\(samples)", "--batch-prompts", "4",
         "--epochs", "\(epochs)", "--votes", "8", "--train-samples", "8", "--max-new-tokens", "1", "--lr", "1e-3",
         "--lora-rank", "2", "--eval-limit", "4"]
    }

    func testTwoProcessesMatchOne() throws {
        let tmp = tempDir("dp")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        // 8 open-ended images, so that the answer prior weighs the votes from the second step on: every process
        // must pay its prompts from the votes of all processes' prompts.
        let rows = try writeResumeRows(tmp, count: 8, openEnded: true)
        let model = try sharpenedTinyModel(in: tmp, scale: 2)
        let one = tmp.appendingPathComponent("one"), two = tmp.appendingPathComponent("two")
        let args = adaptArguments(rows, model: model, epochs: 2, samples: 8) + ["--answer-balance", "1"]
        try runAloneAndLaunched(args, single: ["--out", one.path], launched: ["--out", two.path],
                                launchTimeout: 120, wait: 300)
        // Adam moves each parameter by up to ≈ lr (1e-3) a step, whatever its gradient's size, so a gradient that
        // missed the other rank's half differs by that much; summation order alone (2 prompts per product
        // against 4: MKL's AVX2 kernels block them differently) gave 1.5e-5 after 3 steps, the gradient norms
        // agreeing to 1e-5 relative (below). The bound is 5e-5, under 2% of the 3e-3 the steps can move.
        XCTAssertLessThan(try largestDifference(one.appendingPathComponent("adapted.safetensors"),
                                                two.appendingPathComponent("adapted.safetensors")), 5e-5,
                          "largest parameter difference after 4 steps")
        let la = try readJSON(AdaptReport.self, from: one.appendingPathComponent("report.json")).log
        let lb = try readJSON(AdaptReport.self, from: two.appendingPathComponent("report.json")).log
        XCTAssertEqual(la.count, 4)
        XCTAssertEqual(la.map(\.majorities), lb.map(\.majorities))
        XCTAssertEqual(la.map(\.itemIds), lb.map(\.itemIds))
        for (x, y) in zip(la, lb) {
            XCTAssertEqual(x.rewardMean, y.rewardMean, accuracy: 1e-9)
            XCTAssertEqual(x.gradNorm, y.gradNorm, accuracy: 1e-5 * max(1, x.gradNorm))
        }
        XCTAssertGreaterThan(la[0].gradNorm, 1, "the first step has a real policy gradient to reduce")
    }

    func testKilledWorkerStopsTheJobWhichResumes() throws {
        let tmp = tempDir("dpkill")
        try FileManager.default.createDirectory(at: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: tmp) }
        let rows = try writeResumeRows(tmp)
        let out = tmp.appendingPathComponent("run")
        let args = ["launch", "--nproc", "2", "--threads", "1", "--timeout", "60", "--"]
            + adaptArguments(rows, model: fixtureDir.appendingPathComponent("qwen25vl"), epochs: 8) + ["--out", out.path]
        let first = try Child(try ttrv(), args)
        defer { first.kill() }
        XCTAssertTrue(first.waitFor("adapt] 2/8", timeout: 300), first.output.value)
        let workers = childProcesses(of: first.process.processIdentifier)
        XCTAssertEqual(workers.count, 2)
        kill(workers.max()!, SIGKILL)
        XCTAssertTrue(first.wait(timeout: 60), "the job kept running after a worker died")
        XCTAssertNotEqual(first.status, 0)
        XCTAssertTrue(first.output.value.contains("was killed by signal 9"), first.output.value)
        let second = try Child(try ttrv(), args)
        XCTAssertTrue(second.wait(timeout: 300), "the resumed job did not finish")
        XCTAssertEqual(second.status, 0, second.output.value)
        XCTAssertTrue(second.output.value.contains("resuming after step"), second.output.value)
        XCTAssertEqual(try readJSON(AdaptReport.self, from: out.appendingPathComponent("report.json")).steps, 8)
    }
}

/// Data-parallel `align`: 2 processes × 2 items per step end where 1 process × 4 items does.
final class DistributedAlignTests: XCTestCase {
    func testTwoProcessesMatchOne() throws {
        let tmp = tempDir("align")
        defer { try? FileManager.default.removeItem(at: tmp) }
        let args = ["align", "--data", "fashion-mnist:train", "--eval-data", "fashion-mnist:test", "--steps", "2",
                    "--batch-size", "4", "--eval-every", "2", "--eval-limit", "2", "--lora-rank", "2", "--lr", "1e-3"]
        let one = tmp.appendingPathComponent("one"), two = tmp.appendingPathComponent("two")
        try runAloneAndLaunched(args, single: ["--out", one.path], launched: ["--out", two.path], launchTimeout: 120,
                                wait: 300)
        XCTAssertLessThan(try largestDifference(one.appendingPathComponent("model.safetensors"),
                                                two.appendingPathComponent("model.safetensors")), 1e-5,
                          "largest parameter difference after 2 steps")
    }
}

/// The tiny Qwen2.5-VL with its (tied) output embedding scaled up, so that its samples repeat and the votes
/// give real advantages (the random model spreads them evenly, leaving only the KL term's tiny gradient,
/// whose rounding noise Adam turns into full-size steps).
func sharpenedTinyModel(in dir: URL, scale: Double = 3) throws -> URL {
    let src = fixtureDir.appendingPathComponent("qwen25vl"), dst = dir.appendingPathComponent("model")
    try FileManager.default.createDirectory(at: dst, withIntermediateDirectories: true)
    var state: [String: Tensor] = [:]
    for f in try FileManager.default.contentsOfDirectory(atPath: src.path) {
        if f.hasSuffix(".safetensors") {
            state.merge(try SafeTensorsFile(url: src.appendingPathComponent(f)).tensors()) { a, _ in a }
        } else if f.hasSuffix(".json") && f != "model.safetensors.index.json" || f.hasSuffix(".jinja") {
            try FileManager.default.copyItem(at: src.appendingPathComponent(f), to: dst.appendingPathComponent(f))
        }
    }
    state["model.embed_tokens.weight"] = try state["model.embed_tokens.weight"]! * scale
    try saveSafeTensors(state, to: dst.appendingPathComponent("model.safetensors"))
    return dst
}
