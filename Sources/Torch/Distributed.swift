import CTorch
import Foundation

/// Errors of a distributed run, each naming what failed and where.
public enum DistributedError: Error, CustomStringConvertible {
    /// A launcher environment variable is missing or malformed.
    case environment(variable: String, problem: String)
    /// The store or the process group could not be set up (no master, port in use, no peers).
    case rendezvous(String)
    /// A collective failed: a peer died, timed out, or the inputs were invalid.
    case collective(String)

    public var description: String {
        switch self {
        case .environment(let v, let p): return "distributed environment: \(v) \(p)"
        case .rendezvous(let m): return "distributed rendezvous: \(m)"
        case .collective(let m): return "distributed \(m)"
        }
    }
}

public enum ReduceOp: Int32, Sendable { case sum = 0, average, max, min }

/// A TCPStore hosted by this process: the launcher's store, which every worker joins as a client
/// (as under torchrun's agent store).
public final class StoreServer: @unchecked Sendable {
    let handle: tt_store
    /// The port it listens on (the one asked for, or the free one picked for port 0).
    public let port: Int

    public init(port: Int = 0, timeout: Double) throws {
        guard let h = tt_store_new("127.0.0.1", Int32(port), 1, timeout) else {
            let message = String(cString: tt_last_error())
            throw DistributedError.rendezvous("cannot host the store on port \(port): \(message)")
        }
        handle = h
        self.port = Int(tt_store_port(h))
    }
    deinit { tt_store_free(handle) }
}

/// This process's place in a data-parallel job and the collectives between its processes.
/// Collectives must be issued in the same order on every rank. With one process every collective
/// is the identity, so callers need no special case.
public final class Distributed: @unchecked Sendable {
    public let rank: Int
    public let worldSize: Int
    /// The rank among the processes of this machine (the CUDA device index, say).
    public let localRank: Int
    /// Seconds any rendezvous or collective may take before it fails.
    public let timeout: Double
    let store: tt_store?
    let group: tt_group?

    public var isMain: Bool { rank == 0 }

    /// One process, no communication.
    public static let single = Distributed(single: ())

    private init(single: Void) {
        rank = 0; worldSize = 1; localRank = 0; timeout = 0; store = nil; group = nil
    }

    /// Joins a job of `worldSize` processes through the store at `masterAddress:masterPort`.
    /// Rank 0 hosts the store unless `agentStore` (a launcher hosts it, and keeps it across restarts:
    /// `attempt` keeps each attempt's keys apart). Gloo's sockets bind to `socketInterface` when
    /// given, else to the local address that routes to the master (loopback for a local master).
    public init(rank: Int, worldSize: Int, localRank: Int, masterAddress: String, masterPort: Int,
                agentStore: Bool, attempt: Int = 0, timeout: Double = 600, socketInterface: String? = nil,
                device: Device = .cpu) throws {
        guard worldSize >= 1, (0..<worldSize).contains(rank) else {
            throw DistributedError.rendezvous("rank \(rank) is not in 0..<\(worldSize)")
        }
        self.rank = rank
        self.worldSize = worldSize
        self.localRank = localRank
        self.timeout = timeout
        // A hosted store listens on all interfaces; its own client then connects over loopback.
        let hosts = rank == 0 && !agentStore
        guard let s = tt_store_new(hosts ? "127.0.0.1" : masterAddress, Int32(masterPort), hosts ? 1 : 0, timeout) else {
            throw DistributedError.rendezvous("rank \(rank): \(String(cString: tt_last_error()))")
        }
        store = s
        let g: tt_group?
        let prefix = "ttrv/attempt_\(attempt)"
        if case .cuda = device {
            g = tt_group_nccl_new(s, prefix, Int32(rank), Int32(worldSize), timeout)
        } else if let socketInterface {
            g = tt_group_gloo_new(s, prefix, Int32(rank), Int32(worldSize), socketInterface, nil, timeout)
        } else {
            let address: String
            do { address = try Distributed.localAddress(towards: masterAddress) } catch {
                tt_store_free(s)
                throw error
            }
            g = tt_group_gloo_new(s, prefix, Int32(rank), Int32(worldSize), nil, address, timeout)
        }
        guard let g else {
            let message = String(cString: tt_last_error())
            tt_store_free(s)
            throw DistributedError.rendezvous("rank \(rank) of \(worldSize): \(message)")
        }
        group = g
    }

    deinit {
        if let group { tt_group_free(group) }
        if let store { tt_store_free(store) }
    }

    /// The job torchrun (or `ttrv launch`) describes in the environment: RANK, WORLD_SIZE,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE,
    /// TORCHELASTIC_RESTART_COUNT, GLOO_SOCKET_IFNAME, and
    /// TTRV_DIST_TIMEOUT (seconds, default 600). No WORLD_SIZE, or 1: a single process.
    public static func fromEnvironment(_ env: [String: String] = ProcessInfo.processInfo.environment,
                                       device: Device = .cpu) throws -> Distributed {
        func int(_ name: String, default value: Int? = nil) throws -> Int {
            guard let s = env[name] else {
                if let value { return value }
                throw DistributedError.environment(variable: name, problem: "is not set")
            }
            guard let v = Int(s), v >= 0 else {
                throw DistributedError.environment(variable: name, problem: "is \"\(s)\", not a non-negative integer")
            }
            return v
        }
        let world = try int("WORLD_SIZE", default: 1)
        guard world > 1 else { return .single }
        let port = try int("MASTER_PORT")
        guard port > 0, port < 65536 else {
            throw DistributedError.environment(variable: "MASTER_PORT", problem: "is \(port), not a port")
        }
        guard let master = env["MASTER_ADDR"], !master.isEmpty else {
            throw DistributedError.environment(variable: "MASTER_ADDR", problem: "is not set")
        }
        var timeout = 600.0
        if let s = env["TTRV_DIST_TIMEOUT"] {
            guard let t = Double(s), t > 0 else {
                throw DistributedError.environment(variable: "TTRV_DIST_TIMEOUT",
                                                   problem: "is \"\(s)\", not seconds > 0")
            }
            timeout = t
        }
        let agent = ["true", "1"].contains(env["TORCHELASTIC_USE_AGENT_STORE"]?.lowercased() ?? "")
        return try Distributed(rank: try int("RANK"), worldSize: world, localRank: try int("LOCAL_RANK", default: 0),
                               masterAddress: master, masterPort: port, agentStore: agent,
                               attempt: try int("TORCHELASTIC_RESTART_COUNT", default: 0), timeout: timeout,
                               socketInterface: env["GLOO_SOCKET_IFNAME"].flatMap { $0.isEmpty ? nil : $0 },
                               device: device)
    }

    /// The local IP address that traffic to `host` leaves from.
    public static func localAddress(towards host: String) throws -> String {
        var buf = [CChar](repeating: 0, count: 64)
        guard tt_local_address_towards(host, &buf, buf.count) == 0 else {
            throw DistributedError.rendezvous(String(cString: tt_last_error()))
        }
        return String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: collectives

    private func check(_ rc: Int32) throws {
        if rc != 0 { throw DistributedError.collective(String(cString: tt_last_error())) }
    }

    /// Reduces `tensors` in place across ranks, as one flattened buffer (one collective).
    /// All must have the same dtype and device.
    public func allreduce(_ tensors: [Tensor], op: ReduceOp = .sum) throws {
        guard let group, !tensors.isEmpty else { return }
        let handles: [tt_tensor?] = tensors.map(\.handle)
        let n = Int32(handles.count)
        try withExtendedLifetime(tensors) { try check(tt_group_allreduce(group, handles, n, op.rawValue)) }
    }

    /// Averages `tensors` in place across ranks (gradients of data-parallel training).
    public func allreduceMean(_ tensors: [Tensor]) throws { try allreduce(tensors, op: .average) }

    /// Element-wise reduction of `values` (same count on every rank) across ranks: global reward
    /// sums, counts for a collapse guard and the like. Float64, so sums of counts stay exact.
    public func allreduce(_ values: [Double], op: ReduceOp = .sum) throws -> [Double] {
        guard group != nil, !values.isEmpty else { return values }
        let t = try Tensor(values)
        try allreduce([t], op: op)
        return try t.doubles()
    }

    /// Overwrites `tensors` everywhere with rank `root`'s values (initial weights, say).
    public func broadcast(_ tensors: [Tensor], from root: Int = 0) throws {
        guard let group, !tensors.isEmpty else { return }
        guard (0..<worldSize).contains(root) else {
            throw DistributedError.collective("broadcast: root \(root) is not in 0..<\(worldSize)")
        }
        let handles: [tt_tensor?] = tensors.map(\.handle)
        let n = Int32(handles.count)
        try withExtendedLifetime(tensors) { try check(tt_group_broadcast(group, handles, n, Int32(root))) }
    }

    /// Every rank's `tensor` (same shape on every rank), stacked along a new first dimension.
    public func allgather(_ tensor: Tensor) throws -> Tensor {
        guard let group else { return try tensor.unsqueeze(0) }
        guard let h = withExtendedLifetime(tensor, { tt_group_allgather(group, tensor.handle) }) else {
            throw DistributedError.collective(String(cString: tt_last_error()))
        }
        return Tensor(handle: h)
    }

    /// Every rank's values, in rank order; the counts may differ between ranks.
    public func allgather(_ values: [Double]) throws -> [[Double]] { try allgatherVariable(values) }

    /// Every rank's bytes (an encoded report, say), in rank order.
    public func allgather(bytes: [UInt8]) throws -> [[UInt8]] { try allgatherVariable(bytes) }

    /// Returns once every rank has called it.
    public func barrier() throws {
        guard let group else { return }
        try check(tt_group_barrier(group))
    }

    /// Gathers the counts first, then the values padded to the longest.
    private func allgatherVariable<T: TensorScalar & Numeric>(_ values: [T]) throws -> [[T]] {
        guard group != nil else { return [values] }
        let counts = try allgather(try Tensor([Int64(values.count)])).toArray(Int64.self).map { Int($0) }
        let width = max(1, counts.max() ?? 0)
        let padded = values + [T](repeating: 0, count: width - values.count)
        let all = try allgather(try Tensor(padded)).toArray(T.self)
        return counts.enumerated().map { r, n in Array(all[(r * width)..<(r * width + n)]) }
    }
}

/// A value shared between threads.
public final class Locked<T>: @unchecked Sendable {
    private var v: T
    private let lock = NSLock()
    public init(_ v: T) { self.v = v }
    public var value: T { lock.lock(); defer { lock.unlock() }; return v }
    public func update(_ f: (inout T) -> Void) { lock.lock(); defer { lock.unlock() }; f(&v) }
}
