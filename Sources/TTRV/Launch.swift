import Foundation
import Torch

public enum LaunchError: Error, CustomStringConvertible {
    case invalid(String)
    case spawn(rank: Int, String)
    case workerFailed(rank: Int, status: String)

    public var description: String {
        switch self {
        case .invalid(let m): return "launch: \(m)"
        case .spawn(let r, let m): return "launch: cannot start rank \(r): \(m)"
        case .workerFailed(let r, let s): return "launch: rank \(r) \(s); the job was stopped"
        }
    }
}

public struct LaunchOptions: Sendable {
    /// Workers on this machine.
    public var nproc: Int
    public var nnodes = 1
    public var nodeRank = 0
    /// Where node 0's launcher hosts the store.
    public var masterAddress = "127.0.0.1"
    /// nil: a free port (one machine only).
    public var masterPort: Int?
    /// libtorch threads per worker; nil: this machine's cores / nproc.
    public var threadsPerWorker: Int?
    /// Seconds any rendezvous or collective may take (TTRV_DIST_TIMEOUT of the workers).
    public var timeout: Double = 600
    /// Extra environment for the workers.
    public var environment: [String: String] = [:]

    public init(nproc: Int) { self.nproc = nproc }
}

/// Starts the workers of this machine the torchrun way: node 0 hosts the store (the agent store,
/// which every worker joins as a client), each worker gets RANK, WORLD_SIZE, LOCAL_RANK,
/// MASTER_ADDR, MASTER_PORT and OMP_NUM_THREADS, its output is prefixed with its rank, SIGINT and
/// SIGTERM are passed on, and when one worker fails the others are stopped.
public final class Launcher {
    let options: LaunchOptions
    let executable: String
    let arguments: [String]
    private let outputLock = NSLock()

    public init(options: LaunchOptions, executable: String, arguments: [String]) throws {
        let o = options
        guard o.nproc >= 1 else { throw LaunchError.invalid("--nproc must be at least 1") }
        guard o.nnodes >= 1, (0..<o.nnodes).contains(o.nodeRank) else {
            throw LaunchError.invalid("--node-rank \(o.nodeRank) is not in 0..<\(o.nnodes)")
        }
        guard o.nnodes == 1 || o.masterPort != nil else {
            throw LaunchError.invalid("--nnodes > 1 needs --master ADDR:PORT (node 0's address)")
        }
        guard o.threadsPerWorker.map({ $0 >= 1 }) ?? true else {
            throw LaunchError.invalid("--threads must be at least 1")
        }
        guard !arguments.isEmpty else { throw LaunchError.invalid("no command to run (ttrv launch ... -- eval ...)") }
        self.options = o
        self.executable = executable
        self.arguments = arguments
    }

    /// Runs the workers to the end; throws when one fails.
    public func run() throws {
        let o = options
        let server = o.nodeRank == 0 ? try StoreServer(port: o.masterPort ?? 0, timeout: o.timeout) : nil
        let port = server?.port ?? o.masterPort!
        let ended = Locked<[(rank: Int, process: Process)]>([])
        let wake = DispatchSemaphore(value: 0)
        var workers: [(process: Process, drained: DispatchGroup)] = []
        for local in 0..<o.nproc {
            let rank = o.nodeRank * o.nproc + local
            let drained = DispatchGroup()
            let p = process(rank: rank, local: local, port: port, drained: drained)
            p.terminationHandler = { proc in
                ended.update { $0.append((rank, proc)) }
                wake.signal()
            }
            do { try p.run() } catch {
                stop(workers.map(\.process))
                throw LaunchError.spawn(rank: rank, "\(error)")
            }
            workers.append((p, drained))
        }
        let restore = forwardSignals(to: workers.map(\.process))
        defer { restore() }
        var failure: LaunchError?
        for i in workers.indices {
            wake.wait()
            guard failure == nil, Self.failed(ended.value[i].process) else { continue }
            // Peers of a dead worker fail too, moments later: let them, then blame the one that was
            // killed by a signal, if any, else the first to fail.
            Thread.sleep(forTimeInterval: 0.2)
            let failed = ended.value.filter { Self.failed($0.process) }
            let culprit = failed.first { $0.process.terminationReason == .uncaughtSignal } ?? failed[0]
            failure = .workerFailed(rank: culprit.rank, status: Self.describe(culprit.process))
            stop(workers.map(\.process))
        }
        workers.forEach { $0.drained.wait() }
        withExtendedLifetime(server) {}
        if let failure { throw failure }
    }

    /// A worker's process, not yet started, with the torchrun environment and relayed output.
    private func process(rank: Int, local: Int, port: Int, drained: DispatchGroup) -> Process {
        let o = options
        let threads = o.threadsPerWorker ?? max(1, ProcessInfo.processInfo.activeProcessorCount / o.nproc)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = arguments
        p.environment = ProcessInfo.processInfo.environment.merging(o.environment) { $1 }.merging([
            "RANK": "\(rank)", "LOCAL_RANK": "\(local)", "WORLD_SIZE": "\(o.nnodes * o.nproc)",
            "LOCAL_WORLD_SIZE": "\(o.nproc)", "GROUP_RANK": "\(o.nodeRank)", "MASTER_ADDR": o.masterAddress,
            "MASTER_PORT": "\(port)", "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "\(threads)",
            "TTRV_DIST_TIMEOUT": "\(o.timeout)",
        ]) { $1 }
        p.standardOutput = relay(rank: rank, to: FileHandle.standardOutput, drained: drained)
        p.standardError = relay(rank: rank, to: FileHandle.standardError, drained: drained)
        return p
    }

    static func failed(_ p: Process) -> Bool {
        p.terminationReason == .uncaughtSignal || p.terminationStatus != 0
    }

    static func describe(_ p: Process) -> String {
        p.terminationReason == .uncaughtSignal
            ? "was killed by signal \(p.terminationStatus)" : "exited with status \(p.terminationStatus)"
    }

    /// A pipe whose lines are copied to `out` with the rank in front.
    private func relay(rank: Int, to out: FileHandle, drained: DispatchGroup) -> Pipe {
        let pipe = Pipe()
        drained.enter()
        let prefix = "[rank \(rank)] "
        Thread { [outputLock] in
            var pending: [UInt8] = []
            func emit(_ line: ArraySlice<UInt8>) {
                outputLock.lock()
                out.write(Data(prefix.utf8) + Data(line) + (line.last == 10 ? Data() : Data([10])))
                outputLock.unlock()
            }
            while true {
                let chunk = pipe.fileHandleForReading.availableData
                if chunk.isEmpty { break }
                pending.append(contentsOf: chunk)
                while let nl = pending.firstIndex(of: 10) {
                    emit(pending[...nl])
                    pending.removeSubrange(...nl)
                }
            }
            if !pending.isEmpty { emit(pending[...]) }
            drained.leave()
        }.start()
        return pipe
    }

    /// SIGTERM to every worker still running, SIGKILL to those still there 5 s later.
    private func stop(_ processes: [Process]) {
        for p in processes where p.isRunning { kill(p.processIdentifier, SIGTERM) }
        DispatchQueue.global().asyncAfter(deadline: .now() + 5) {
            for p in processes where p.isRunning { kill(p.processIdentifier, SIGKILL) }
        }
    }

    /// SIGINT and SIGTERM to the launcher go to every worker; the launcher then reports how they
    /// ended. Returns what puts the previous handling back.
    private func forwardSignals(to processes: [Process]) -> () -> Void {
        let forwarded = [SIGINT, SIGTERM].map { sig in
            let previous = signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler {
                for p in processes where p.isRunning { kill(p.processIdentifier, sig) }
            }
            source.resume()
            return (sig, previous, source)
        }
        return {
            for (sig, previous, source) in forwarded {
                source.cancel()
                signal(sig, previous)
            }
        }
    }
}

