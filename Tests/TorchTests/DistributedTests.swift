import Foundation
import XCTest
@testable import Torch

/// c10d collectives between two ranks in one process (two Gloo process groups on loopback, one per
/// thread, joined through a store this test hosts), checked against hand-computed results.
final class DistributedTests: XCTestCase {
    /// Runs `body(rank)` for ranks 0 and 1 on two threads at once; returns each rank's result.
    func twoRanks<R>(timeout: Double = 30, server: StoreServer? = nil, attempt: Int = 0,
                     _ body: @escaping @Sendable (Distributed) throws -> R) throws -> [Result<R, Error>] {
        let server = try server ?? StoreServer(port: 0, timeout: timeout)
        let results = Locked<[Int: Result<R, Error>]>([:])
        let done = DispatchGroup()
        for rank in 0..<2 {
            done.enter()
            let t = Thread {
                let r = Result { () throws -> R in
                    let d = try Distributed(rank: rank, worldSize: 2, localRank: rank, masterAddress: "127.0.0.1",
                                            masterPort: server.port, agentStore: true, attempt: attempt, timeout: timeout)
                    return try body(d)
                }
                results.update { $0[rank] = r }
                done.leave()
            }
            t.start()
        }
        XCTAssertEqual(done.wait(timeout: .now() + timeout + 30), .success, "ranks did not finish")
        return withExtendedLifetime(server) { results.value.sorted { $0.key < $1.key }.map(\.value) }
    }

    func testCollectivesGiveExactResults() throws {
        struct Out { var sum: [[Float]], mean: [Float], ints: [Int64], bcast: [Double], gathered: [Float], shape: [Int],
                     values: [[Double]], bytes: [[UInt8]], maxima: [Double], averages: [Double] }
        let results = try twoRanks { d -> Out in
            let r = Float(d.rank)
            // Two tensors of different shapes, reduced as one bucket.
            let a = try Tensor([1 + r, 2 + r, 3 + r, 4 + r, 5 + r, 6 + r], shape: [2, 3])
            let b = try Tensor([10 * (r + 1), -r])
            try d.allreduce([a, b])
            let m = try Tensor([1 + 2 * r, 7 - 4 * r])
            try d.allreduceMean([m])
            let i = try Tensor([Int64(d.rank + 1) * 5])
            try d.allreduce([i], op: .sum)
            let c = try Tensor([Double(d.rank) + 0.5, -Double(d.rank)])
            let before = c.version
            try d.broadcast([c], from: 1) // one contiguous tensor: written in place, no copy
            guard c.version > before else { throw TorchError("broadcast did not bump the version") }
            let g = try d.allgather(try Tensor([r, r + 0.25]))
            let values = try d.allgather(d.rank == 0 ? [1.5, 2.5, 3.5] : [4.5])
            let bytes = try d.allgather(bytes: d.rank == 0 ? [] : [7, 8])
            let maxima = try d.allreduce([Double(d.rank), -Double(d.rank)], op: .max)
            let averages = try d.allreduce([0.5 + Double(d.rank)], op: .average)
            try d.barrier()
            return Out(sum: [try a.floats(), try b.floats()], mean: try m.floats(), ints: try i.toArray(Int64.self),
                       bcast: try c.doubles(), gathered: try g.floats(), shape: g.shape, values: values, bytes: bytes,
                       maxima: maxima, averages: averages)
        }
        for (rank, result) in results.enumerated() {
            let o = try result.get()
            XCTAssertEqual(o.sum, [[3, 5, 7, 9, 11, 13], [30, -1]], "rank \(rank)")
            XCTAssertEqual(o.mean, [2, 5], "rank \(rank)")
            XCTAssertEqual(o.ints, [15], "rank \(rank)")
            XCTAssertEqual(o.bcast, [1.5, -1], "rank \(rank)")
            XCTAssertEqual(o.gathered, [0, 0.25, 1, 1.25], "rank \(rank)")
            XCTAssertEqual(o.shape, [2, 2], "rank \(rank)")
            XCTAssertEqual(o.values, [[1.5, 2.5, 3.5], [4.5]], "rank \(rank)")
            XCTAssertEqual(o.bytes, [[], [7, 8]], "rank \(rank)")
            XCTAssertEqual(o.maxima, [1, 0], "rank \(rank)")
            XCTAssertEqual(o.averages, [1], "rank \(rank)")
        }
    }

    /// A restarted job meets in the store of the previous attempt (torchrun's agent store), its
    /// keys under the new attempt's prefix. (In one process c10d already keeps two groups' keys
    /// apart, so this checks that the prefixed rendezvous works, not that stale keys would hurt.)
    func testRestartedAttemptOnTheSameStore() throws {
        let server = try StoreServer(port: 0, timeout: 30)
        for attempt in 0..<2 {
            let results = try twoRanks(server: server, attempt: attempt) { d -> [Float] in
                let t = try Tensor([Float(d.rank + 1 + attempt)])
                try d.allreduce([t])
                return try t.floats()
            }
            XCTAssertEqual(try results.map { try $0.get() }, [[Float(3 + 2 * attempt)], [Float(3 + 2 * attempt)]])
        }
    }

    func testMixedDtypesAreRejectedOnEveryRank() throws {
        let results = try twoRanks { d in
            try d.allreduce([try Tensor([Float(1)]), try Tensor([Double(1)])])
        }
        for result in results {
            XCTAssertThrowsError(try result.get()) { e in
                XCTAssertTrue("\(e)".contains("allreduce") && "\(e)".contains("tensor 1"), "\(e)")
            }
        }
    }

    func testCollectiveFailsAtDeadlineWhenPeerNeverJoins() throws {
        let rank0Done = DispatchSemaphore(value: 0)
        let start = Date()
        let results = try twoRanks(timeout: 2) { d in
            if d.rank == 1 {
                // Alive but never joins the allreduce; stays connected until rank 0 gave up.
                _ = rank0Done.wait(timeout: .now() + 30)
                return
            }
            defer { rank0Done.signal() }
            try d.allreduce([try Tensor([Float(1)])])
        }
        XCTAssertThrowsError(try results[0].get()) { e in XCTAssertTrue("\(e)".contains("allreduce (rank 0 of 2)"), "\(e)") }
        XCTAssertLessThan(Date().timeIntervalSince(start), 20)
    }

    func testClientGivesUpWhenNoStoreAnswers() throws {
        let start = Date()
        // Port 1 is privileged and unused: every connection attempt is refused.
        XCTAssertThrowsError(try Distributed(rank: 1, worldSize: 2, localRank: 1, masterAddress: "127.0.0.1",
                                             masterPort: 1, agentStore: true, timeout: 1.5)) { e in
            XCTAssertTrue("\(e)".contains("no store answered at 127.0.0.1:1"), "\(e)")
        }
        XCTAssertLessThan(Date().timeIntervalSince(start), 10)
    }

    func testNCCLIsReportedMissingInACPUBuild() throws {
        try XCTSkipIf(LibTorch.cudaAvailable, "a CUDA build: the NCCL path is compiled")
        let server = try StoreServer(port: 0, timeout: 10)
        XCTAssertThrowsError(try Distributed(rank: 0, worldSize: 2, localRank: 0, masterAddress: "127.0.0.1",
                                             masterPort: server.port, agentStore: true, timeout: 5, device: .cuda(0))) { e in
            XCTAssertTrue("\(e)".contains("nccl process group: not built"), "\(e)")
        }
    }

    func testEnvironment() throws {
        XCTAssertEqual(try Distributed.fromEnvironment([:]).worldSize, 1)
        XCTAssertEqual(try Distributed.fromEnvironment(["WORLD_SIZE": "1", "RANK": "0"]).worldSize, 1)
        let base = ["WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"]
        func problem(_ env: [String: String]) -> String {
            do { _ = try Distributed.fromEnvironment(env); return "no error" } catch { return "\(error)" }
        }
        XCTAssertTrue(problem(base.merging(["MASTER_PORT": "x"]) { $1 }).contains("MASTER_PORT is \"x\""))
        XCTAssertTrue(problem(base.merging(["MASTER_PORT": "70000"]) { $1 }).contains("MASTER_PORT is 70000"))
        XCTAssertTrue(problem(base.filter { $0.key != "RANK" }).contains("RANK is not set"))
        XCTAssertTrue(problem(base.filter { $0.key != "MASTER_ADDR" }).contains("MASTER_ADDR is not set"))
        XCTAssertTrue(problem(base.merging(["RANK": "2"]) { $1 }).contains("rank 2 is not in 0..<2"))
        XCTAssertTrue(problem(base.merging(["TTRV_DIST_TIMEOUT": "0"]) { $1 }).contains("TTRV_DIST_TIMEOUT"))
    }

    func testSingleProcessCollectivesAreIdentity() throws {
        let d = Distributed.single
        let t = try Tensor([Float(1), 2])
        try d.allreduceMean([t])
        try d.broadcast([t])
        try d.barrier()
        XCTAssertEqual(try t.floats(), [1, 2])
        XCTAssertEqual(try d.allgather(t).shape, [1, 2])
        XCTAssertEqual(try d.allgather([3.0]), [[3.0]])
    }

    func testLocalAddressTowardsLoopback() throws {
        XCTAssertEqual(try Distributed.localAddress(towards: "127.0.0.1"), "127.0.0.1")
        XCTAssertThrowsError(try Distributed.localAddress(towards: "no-such-host.invalid"))
    }
}

