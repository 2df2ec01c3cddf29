import Foundation
import Torch

extension Bench {
    /// Median seconds of an allreduce (sum) of `floats` float32 values across `d`'s processes,
    /// after one warm-up. Ranks meet at a barrier before each timed call, so the time is the
    /// collective's, not the ranks' skew; every result is checked.
    public static func allreduceMedianSeconds(_ d: Distributed, floats: Int, iterations: Int) throws -> Double {
        let t = try Tensor.zeros([max(1, floats)])
        let expected = Double(d.worldSize * (d.worldSize + 1) / 2)
        var times: [Double] = []
        for i in 0...max(1, iterations) {
            try t.fill_(Double(d.rank + 1))
            try d.barrier()
            let t0 = DispatchTime.now().uptimeNanoseconds
            try d.allreduce([t])
            if i > 0 { times.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9) }
            let (lo, hi) = (try t.min().item(), try t.max().item())
            guard lo == expected, hi == expected else {
                throw DistributedError.collective("allreduce check: got values in [\(lo), \(hi)], expected \(expected)")
            }
        }
        return times.sorted()[times.count / 2]
    }

    /// Median seconds of an allreduce of `floats` floats between 2 local processes of `executable`
    /// (a ttrv binary, which runs `dist-bench` under `ttrv launch`), one libtorch thread each.
    public static func twoProcessAllreduceSeconds(executable: String, floats: Int, iterations: Int) throws -> Double {
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("ttrv-allreduce-\(getpid()).json")
        defer { try? FileManager.default.removeItem(at: out) }
        var o = LaunchOptions(nproc: 2)
        o.threadsPerWorker = 1
        o.timeout = 120
        let args = ["dist-bench", "--floats", "\(floats)", "--iterations", "\(iterations)", "--json", out.path]
        try Launcher(options: o, executable: executable, arguments: args).run()
        let result = try JSONDecoder().decode([String: Double].self, from: Data(contentsOf: out))
        guard let s = result["allreduce_seconds"] else {
            throw DistributedError.collective("dist-bench wrote no allreduce_seconds to \(out.path)")
        }
        return s
    }

    /// Median seconds of an adapt step on the default VLM (4 prompts per step, 2 steps after a warm-up
    /// step), as one process with 2 threads or as 2 processes of 1 thread each (same global batch).
    public static func adaptStepSeconds(executable: String, processes: Int) throws -> Double {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ttrv-adapt-bench-\(getpid())-\(processes)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let adapt = ["adapt", "--model", "default", "--data", "fashion-mnist-c:contrast:5", "--adapt-samples", "12",
                     "--batch-prompts", "4", "--epochs", "1", "--eval-limit", "2", "--no-vision-norm", "--out", dir.path]
        if processes == 1 {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: executable)
            p.arguments = adapt + ["--threads", "2"]
            p.standardOutput = FileHandle.nullDevice
            try p.run()
            p.waitUntilExit()
            guard p.terminationStatus == 0 else { throw DistributedError.collective("bench adapt exited \(p.terminationStatus)") }
        } else {
            var o = LaunchOptions(nproc: processes)
            o.threadsPerWorker = 1
            o.timeout = 600
            try Launcher(options: o, executable: executable, arguments: adapt).run()
        }
        let log = try String(contentsOf: dir.appendingPathComponent("adapt_log.jsonl"), encoding: .utf8)
        let seconds = try log.split(separator: "\n").dropFirst().map { try JSONDecoder().decode(StepLog.self, from: Data($0.utf8)).seconds }
        return seconds.sorted()[seconds.count / 2]
    }
}
