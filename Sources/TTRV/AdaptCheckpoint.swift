import Foundation
import Models
import Torch

/// What makes a checkpoint count: written last, atomically, naming the files it belongs to, so a run
/// killed at any point resumes from a complete checkpoint.
struct RunState: Codable {
    var completedSteps: Int
    var stoppedEarly: String?
    var seconds: Double
    var fingerprint: String
    var weights: String?
    var optimizer: String?
    /// The weights of the last step without a warning sign, when the checkpointed step had one.
    var lastGood: String?

    enum CodingKeys: String, CodingKey {
        case completedSteps = "completed_steps", stoppedEarly = "stopped_early", seconds, fingerprint, weights
        case optimizer, lastGood = "last_good"
    }
}

extension Adapter {
    var checkpointDir: URL { out.appendingPathComponent("checkpoint") }
    var stateURL: URL { checkpointDir.appendingPathComponent("state.json") }
    var logURL: URL { out.appendingPathComponent("adapt_log.jsonl") }

    /// Checkpoint cadence: small checkpoints (LoRA, projector) every step, large ones (full fine-tuning
    /// writes weights and two Adam moments) every 5; always the last step and a guard stop.
    func shouldCheckpoint(after run: RunState, of total: Int) -> Bool {
        let bytes = 3 * 4 * trainableCount
        let every = options.checkpointEvery ?? (bytes <= 256 << 20 ? 1 : 5)
        return run.completedSteps % every == 0 || run.completedSteps == total || run.stoppedEarly != nil
    }

    func saveCheckpoint(_ run: RunState, lastGood: [Tensor]?) throws {
        try FileManager.default.createDirectory(at: checkpointDir, withIntermediateDirectories: true)
        var state = run
        let tag = String(format: "%05d", run.completedSteps)
        state.weights = "weights-\(tag).safetensors"
        state.optimizer = "optimizer-\(tag).safetensors"
        try saveSafeTensors(named(trainable.map(\.tensor)), to: checkpointDir.appendingPathComponent(state.weights!))
        try saveSafeTensors(optimizer.state(), to: checkpointDir.appendingPathComponent(state.optimizer!))
        if let lastGood {
            state.lastGood = "last_good-\(tag).safetensors"
            try saveSafeTensors(named(lastGood), to: checkpointDir.appendingPathComponent(state.lastGood!))
        }
        try writeJSON(state, to: stateURL)
        // Only now are the older files no longer needed.
        let keep: Set<String> = ["state.json", state.weights!, state.optimizer!, state.lastGood ?? ""]
        for f in try FileManager.default.contentsOfDirectory(atPath: checkpointDir.path) where !keep.contains(f) {
            try FileManager.default.removeItem(at: checkpointDir.appendingPathComponent(f))
        }
    }

    func named(_ tensors: [Tensor]) -> [String: Tensor] {
        Dictionary(uniqueKeysWithValues: zip(trainable.map(\.name), tensors))
    }

    /// The run state of an earlier, interrupted run with the same options, its weights and optimiser
    /// state loaded; nil when there is none.
    func resume(fingerprint: String) throws -> RunState? {
        guard FileManager.default.fileExists(atPath: stateURL.path) else { return nil }
        let state = try readJSON(RunState.self, from: stateURL)
        guard state.fingerprint == fingerprint else {
            throw AdaptError.checkpoint(out, "holds a run with other options or data; use another --out or delete it")
        }
        guard let w = state.weights, let o = state.optimizer else {
            throw AdaptError.checkpoint(stateURL, "names no weights")
        }
        try restore(loadTrained(checkpointDir.appendingPathComponent(w)))
        do {
            try optimizer.loadState(SafeTensorsFile(url: checkpointDir.appendingPathComponent(o)).tensors())
        } catch { throw AdaptError.checkpoint(checkpointDir.appendingPathComponent(o), "\(error)") }
        return state
    }

    func restoredLastGood(_ run: RunState) throws -> [Tensor]? {
        guard let name = run.lastGood else { return run.completedSteps > 0 ? try copies(trainable.map(\.tensor)) : nil }
        return try loadTrained(checkpointDir.appendingPathComponent(name))
    }

    /// The trained tensors as saved in `url`, in `trainable` order.
    func loadTrained(_ url: URL) throws -> [Tensor] {
        let file = try SafeTensorsFile(url: url)
        return try trainable.map { name, t in
            guard file.entries[name] != nil else { throw AdaptError.checkpoint(url, "no tensor \(name)") }
            let v = try file.tensor(name)
            guard v.shape == t.shape else {
                throw AdaptError.checkpoint(url, "\(name) has shape \(v.shape), expected \(t.shape)")
            }
            return v
        }
    }

    func readLog() throws -> [StepLog] {
        guard FileManager.default.fileExists(atPath: logURL.path) else { return [] }
        let text = try String(contentsOf: logURL, encoding: .utf8)
        return try text.split(separator: "\n").enumerated().map { n, line in
            do { return try JSONDecoder().decode(StepLog.self, from: Data(line.utf8)) } catch {
                throw AdaptError.checkpoint(logURL, "line \(n + 1) is not a step log line (\(error))")
            }
        }
    }

    func writeLog(_ logs: [StepLog]) throws {
        let enc = JSONEncoder()
        enc.outputFormatting = .sortedKeys
        let text = try logs.map { String(decoding: try enc.encode($0), as: UTF8.self) + "\n" }.joined()
        try Data(text.utf8).write(to: logURL, options: .atomic)
    }

    /// adapted.safetensors: the trained tensors, with what `AdaptedWeights.apply` needs to rebuild the model.
    func saveAdapted(steps: Int) throws {
        var meta = ["ttrv": "adapted", "steps": "\(steps)",
                    "trained_parts": trainedParts.map(\.rawValue).joined(separator: ",")]
        if let lora = vlm.parts.language.namedModules().lazy.compactMap({ ($0.module as? Linear)?.lora }).first {
            meta["lora_rank"] = "\(lora.rank)"
            meta["lora_alpha"] = "\(lora.scale * Double(lora.rank))"
        }
        try saveSafeTensors(named(trainable.map(\.tensor)), metadata: meta,
                            to: out.appendingPathComponent(AdaptedWeights.file))
    }
}

/// An adaptation run's result applied to a freshly loaded model (`eval`/`generate --weights`).
public enum AdaptedWeights {
    public static let file = "adapted.safetensors"
    public static let visionCorrectionFile = "vision_correction.safetensors"

    /// `url` is a run directory or an adapted.safetensors file. Adds LoRA adapters where the run had
    /// them, loads every tensor by name, and applies the run's vision corrections if it made any.
    /// Returns a one-line description.
    public static func apply(_ url: URL, to vlm: VisionLanguageModel) throws -> String {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir) else {
            throw AdaptError.checkpoint(url, "no such run directory or weights file")
        }
        let weights = isDir.boolValue ? url.appendingPathComponent(file) : url
        let st = try SafeTensorsFile(url: weights)
        if let r = st.metadata["lora_rank"].flatMap(Int.init) {
            try vlm.addLoRA(rank: r, alpha: st.metadata["lora_alpha"].flatMap(Double.init), seed: 0)
        }
        let params = Dictionary(uniqueKeysWithValues: vlm.module.namedParameters().map { ($0.name, $0.tensor) })
        try noGrad {
            for name in st.names {
                guard let p = params[name] else {
                    throw AdaptError.checkpoint(weights, "\(name) is not a parameter of this model")
                }
                let v = try st.tensor(name)
                guard v.shape == p.shape else {
                    throw AdaptError.checkpoint(weights, "\(name) has shape \(v.shape), expected \(p.shape)")
                }
                try p.copy_(v)
            }
        }
        var what = "\(st.names.count) tensors from \(weights.path)"
        let runDir = isDir.boolValue ? url : url.deletingLastPathComponent()
        let corrections = runDir.appendingPathComponent(visionCorrectionFile)
        if FileManager.default.fileExists(atPath: corrections.path) {
            guard let composed = vlm as? ComposedVLM else {
                throw AdaptError.checkpoint(corrections, "vision corrections need a composed VLM")
            }
            try composed.setVisionCorrections(SafeTensorsFile(url: corrections).tensors(as: .float32), from: corrections)
            what += " and vision batch-norm corrections"
        }
        vlm.clearImageCache()
        return what
    }

    /// The options of the run in `dir` (its report.json), for evaluating it the same way.
    public static func runOptions(_ dir: URL) throws -> AdaptOptions? {
        let report = dir.appendingPathComponent("report.json")
        guard FileManager.default.fileExists(atPath: report.path) else { return nil }
        return try readJSON(AdaptReport.self, from: report).options
    }
}

/// JSON from a file, with an error that names it.
public func readJSON<T: Decodable>(_ type: T.Type, from url: URL) throws -> T {
    do { return try JSONDecoder().decode(type, from: Data(contentsOf: url)) } catch {
        throw DatasetError(message: "\(url.path): not a valid \(type) (\(error))")
    }
}
