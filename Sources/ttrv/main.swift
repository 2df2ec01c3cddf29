import ArgumentParser
import Foundation
import Models
import TTRV
import Torch

@main
enum Entry {
    static func main() {
        // OpenMP threads that spin while waiting lose badly whenever another process wants the same
        // cores (measured: 12.2 s vs 2.6 s for a 16-token reply on a busy 2-core machine; a TTRV step
        // 17 s instead of 2.1 s next to another ttrv, 77% of it spinning), but threads that sleep at
        // once pay a futex wake-up for each of the thousands of parallel regions a step runs (bf16
        // prefill 420 vs 1000 tok/s on a quiet machine). So threads sleep at once (PASSIVE) on a
        // busy machine and spin briefly first (GOMP_SPINCOUNT) on a quiet one, judged by the processes
        // runnable at start. libgomp reads both settings when it is loaded, before main: re-execute
        // once with them set, unless the user chose either.
        if getenv("OMP_WAIT_POLICY") == nil && getenv("GOMP_SPINCOUNT") == nil {
            setenv("OMP_WAIT_POLICY", "PASSIVE", 1)
            if machineIsQuiet() { setenv("GOMP_SPINCOUNT", "30000", 1) }
            let args = CommandLine.unsafeArgv
            execv("/proc/self/exe", args)
        }
        TTRVCommand.main()
    }
}

/// Whether other runnable processes leave at least half of the cores idle right now (the running count of
/// /proc/loadavg, this process excluded; the load averages lag by minutes, so a job started right after a
/// build would count the build).
func machineIsQuiet() -> Bool {
    guard let text = try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8) else { return false }
    let fields = text.split(separator: " ")
    guard fields.count > 3, let running = fields[3].split(separator: "/").first.flatMap({ Int($0) }) else { return false }
    return Double(running - 1) < 0.5 * Double(ProcessInfo.processInfo.activeProcessorCount)
}

struct TTRVCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ttrv",
        abstract: "Test-time reinforcement learning for vision-language models.",
        subcommands: [Generate.self, Eval.self, Adapt.self, Align.self, Calibrate.self, Demo.self, BenchCommand.self, Report.self,
                      Launch.self, DistBench.self]
    )
}

/// Options every command that runs a model shares.
struct RuntimeOptions: ParsableArguments {
    @Option(help: "Threads for libtorch (default: OMP_NUM_THREADS, which `ttrv launch` sets, else all cores).")
    var threads: Int?
    @Option(help: "Matrix products in bf16 (fp32 weights, optimiser and reductions) or fp32. Default: bf16 where the CPU multiplies bf16 natively.")
    var dtype: String?

    /// For the start line of long-running commands.
    var precisionLine: String {
        "precision \(Precision.current.rawValue)" + (dtype == nil ? " (auto: the CPU \(Precision.cpuHasBF16 ? "has" : "lacks") native bf16)" : "")
    }

    func apply() throws {
        let fromLauncher = ProcessInfo.processInfo.environment["OMP_NUM_THREADS"].flatMap { Int($0) }
        LibTorch.threads = threads ?? fromLauncher ?? ProcessInfo.processInfo.activeProcessorCount
        if let dtype {
            guard let p = Precision(rawValue: dtype) else { throw ValidationError("--dtype must be bf16 or fp32") }
            Precision.current = p
        } else {
            Precision.current = Precision.cpuHasBF16 ? .bf16 : .fp32
        }

    }
}

func resolveLM(_ spec: String) throws -> URL {
    if spec == "default-lm" {
        let url = LMLoader.defaultLMPath()
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw ValidationError("default-lm is not installed (\(url.path)); run `make setup`")
        }
        return url
    }
    return URL(fileURLWithPath: spec)
}

func eprint(_ s: String) { FileHandle.standardError.write((s + "\n").data(using: .utf8)!) }

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Generate text from a prompt.")

    @Option(help: "A GGUF file, an HF model directory, or default-lm.")
    var model: String = "default-lm"
    @Option(help: "The user message.")
    var prompt: String
    @Option(help: "A system message (default: the model's chat template default).")
    var system: String?
    @Option(name: .customLong("max-tokens")) var maxTokens: Int = 128
    @Option(help: "0 = greedy.") var temperature: Double = 0
    @Option(name: .customLong("top-p")) var topP: Double = 1
    @Option(name: .customLong("top-k")) var topK: Int = 0
    @Option(help: "Number of samples (one prefill, fanned out).") var samples: Int = 1
    @Option var seed: UInt64 = 0
    @Flag(name: .customLong("raw"), help: "Send the prompt as is, without the chat template.") var raw = false
    @Option(name: .customLong("chat-template"), help: "A Jinja chat template (or chat_template.json) to use instead of the model's.")
    var chatTemplate: String?
    @Option(help: "An image for a VLM (--model is then a VLM directory or `default`).") var image: String?
    @Option(help: "Apply an adaptation run's result first (its directory or an adapted.safetensors file).") var weights: String?
    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        guard samples >= 1 else { throw ValidationError("--samples must be at least 1") }
        guard maxTokens >= 1 else { throw ValidationError("--max-tokens must be at least 1") }
        guard (0...1).contains(topP), topP > 0 else { throw ValidationError("--top-p must be in (0, 1]") }
        guard temperature >= 0 else { throw ValidationError("--temperature must be >= 0") }
    }

    var chatTemplateURL: URL? { chatTemplate.map { URL(fileURLWithPath: $0) } }

    func run() throws {
        try runtime.apply()
        let params = SamplingParams(temperature: temperature, topP: topP, topK: topK, maxTokens: maxTokens, seed: seed)
        if image != nil || weights != nil {
            let vlm = try ModelRegistry.load(model == "default-lm" && image != nil ? "default" : model,
                                              chatTemplate: chatTemplateURL)
            if let weights { eprint("weights: " + (try AdaptedWeights.apply(URL(fileURLWithPath: weights), to: vlm))) }
            let picture = try image.map { try Image.load(URL(fileURLWithPath: $0)) }
            let prompt = try vlm.prepare(text: self.prompt, image: picture, system: system)
            let gen = TextGenerator(lm: vlm.lm, tokenizer: vlm.tokenizer, stopIds: vlm.stopIds)
            for (i, c) in try gen.generate(prompt, samples: samples, params: params).enumerated() {
                print(samples > 1 ? "--- sample \(i + 1) (\(c.tokens.count) tokens, \(c.finish.rawValue))\n\(c.text)" : c.text)
            }
            return
        }
        var lm = try LMLoader.load(try resolveLM(model))
        if let url = chatTemplateURL { lm.template = try ChatTemplate.load(url, specialTokens: lm.template.specialTokens) }
        var messages: [ChatMessage] = []
        if let system { messages.append(.system(system)) }
        messages.append(.user(prompt))
        let text = raw ? prompt : try lm.template.render(messages, addGenerationPrompt: true)
        let ids = lm.tokenizer.encode(text)
        let gen = TextGenerator(lm: lm.model, tokenizer: lm.tokenizer, stopIds: lm.stopIds)
        if samples == 1 {
            let out = try gen.generate(prompt: ids, params: params) { piece in
                FileHandle.standardOutput.write(piece.data(using: .utf8)!)
            }
            print("")
            eprint("[\(out[0].tokens.count) tokens, finish: \(out[0].finish.rawValue)]")
        } else {
            for (i, c) in try gen.generate(prompt: ids, samples: samples, params: params).enumerated() {
                print("--- sample \(i + 1) (\(c.tokens.count) tokens, \(c.finish.rawValue))\n\(c.text)")
            }
        }
    }
}

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench", abstract: "Speed and memory benchmarks (use a release build).")

    @Option(help: "Where to merge the results.") var json: String = "bench-results.json"
    @Option(help: "Which groups to run: foundation, generate, step, eval, dist.") var only: [String] = []
    @Option(help: "Threads (the reference pins 2).") var threads: Int = 2
    @Option(help: "Only this precision (default: fp32, and bf16 where the CPU has it).") var dtype: Precision?
    @Option(help: "Write libtorch's operator profile of the TTRV step to DIR/step-<dtype>.txt (slows the step).")
    var profile: String?

    func run() throws {
        LibTorch.threads = threads
        let want = { (g: String) in only.isEmpty || only.contains(g) }
        var entries: [BenchEntry] = []
        func add(_ name: String, _ value: Double, _ unit: String) {
            entries.append(BenchEntry(name: name, value: value, unit: unit))
            eprint(String(format: "%-34@ %12.2f %@", name as NSString, value, unit))
        }
        let precisions = dtype.map { [$0] } ?? (Precision.cpuHasBF16 ? [.fp32, .bf16] : [.fp32])
        var peer: [String: Double] = [:]
        for precision in precisions {
            Precision.current = precision
            let sfx = precision == .bf16 ? "_bf16" : ""
            eprint("— \(precision.rawValue)")
            if want("foundation") {
                let dt: DType = precision == .bf16 ? .bfloat16 : .float32
                add("matmul_1024_gflops" + sfx, try Bench.matmul(m: 1024, k: 1024, n: 1024, dtype: dt), "GFLOP/s")
                add("matmul_4096x1024x1024_gflops" + sfx, try Bench.matmul(m: 4096, k: 1024, n: 1024, dtype: dt), "GFLOP/s")
                let (f, fb) = try Bench.blockStack()
                add("llama12_forward_ms" + sfx, f * 1000, "ms")
                add("llama12_forward_backward_ms" + sfx, fb * 1000, "ms")
            }
            if want("generate") {
                let url = LMLoader.defaultLMPath()
                let lm = try LMLoader.load(url)
                let g = try Bench.generation(lm)
                eprint("prompt: \(g.promptTokens) tokens")
                add("prefill_tokens_per_s" + sfx, g.prefillTokensPerS, "tok/s")
                add("decode_batch1_tokens_per_s" + sfx, g.decodeBatch1TokensPerS, "tok/s")
                add("decode_batch32_tokens_per_s" + sfx, g.decodeBatch32TokensPerS, "tok/s")
                add("fanout32_tokens_per_s" + sfx, g.fanout32TokensPerS, "tok/s")
                peer.merge(Bench.peer(mode: "generate", gguf: url, precision: precision, log: eprint)) { a, _ in a }
            }
            if want("step") {
                let url = LMLoader.defaultLMPath()
                let lm = try LMLoader.load(url)
                let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("ttrv-bench-\(getpid())")
                defer { try? FileManager.default.removeItem(at: tmp) }
                let profilePath = try profile.map { dir in
                    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
                    return "\(dir)/step-\(precision.rawValue).txt"
                }
                var logs = try Bench.ttrvSteps(lm, out: tmp.appendingPathComponent("before"), profile: profilePath)
                // Our peak includes the training step, so compare with the reference's step-mode peak.
                let reference = Bench.peer(mode: "step", gguf: url, precision: precision, log: eprint)
                peer.merge(reference) { _, b in b }
                // The reference's step takes minutes on a shared machine whose speed drifts: timing ours again
                // after it, and taking the median of both sides, keeps the ratio from hanging on which side of
                // the drift each was measured.
                if !reference.isEmpty, profile == nil {
                    logs += try Bench.ttrvSteps(lm, out: tmp.appendingPathComponent("after"))
                }
                let s = Bench.stepMedians(logs)
                for name in ["ttrv_step_seconds", "ttrv_rollout_seconds", "ttrv_old_ref_logprob_seconds",
                             "ttrv_fwd_bwd_seconds", "ttrv_optim_seconds"] {
                    add(name + sfx, s[name]!, "s")
                }
            }
            if want("eval") {
                let data = try Dataset.open("fashion-mnist:test")
                add("eval_images_per_s" + sfx, try Bench.evalImagesPerSecond(ModelRegistry.load("default"), data: data), "img/s")
            }
        }
        if let step = entries.first(where: { $0.name == "ttrv_step_seconds" }),
           let bf = entries.first(where: { $0.name == "ttrv_step_seconds_bf16" }) {
            add("ttrv_step_bf16_over_fp32", bf.value / step.value, "x")
        }
        if want("dist") {
            // A gradient allreduce of a 135M-parameter model between 2 local processes (1 thread each).
            let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
            add("allreduce_135m_floats_2proc_seconds",
                try Bench.twoProcessAllreduceSeconds(executable: exe, floats: 135_000_000, iterations: 5), "s")
            add("adapt_step_seconds_1proc", try Bench.adaptStepSeconds(executable: exe, processes: 1), "s")
            add("adapt_step_seconds_2proc", try Bench.adaptStepSeconds(executable: exe, processes: 2), "s")
        }
        add("peak_rss_mib", Bench.peakRSSMiB(), "MiB")
        Bench.attach(&entries, peer: peer)
        print("\n| metric | ours | reference | ratio (× better) |\n|---|---|---|---|")
        for e in entries {
            let p = e.peer_value.map { String(format: "%.2f", $0) } ?? "–"
            let r = e.ratio.map { String(format: "%.2f", $0) } ?? "–"
            print("| \(e.name) | \(String(format: "%.2f", e.value)) \(e.unit) | \(p) | \(r) |")
        }
        try Bench.write(entries, to: URL(fileURLWithPath: json))
        eprint("wrote \(json)")
    }
}

func parseStyle(_ s: String) throws -> AnswerStyle {
    guard let v = AnswerStyle(rawValue: s) else { throw ValidationError("--answers must be strict or reference") }
    return v
}

struct Calibrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure a composed VLM's vision batch-norm statistics on its (clean) training data, for --vision-norm.")
    @Option(help: "A composed model directory or `default`.") var model: String = "default"
    @Option(help: "Clean, in-domain images (labels unused). Repeat for a model trained on several kinds of image: each is a source domain, and matching picks the nearest.")
    var data: [String] = ["fashion-mnist:train"]
    @Option(help: "Images per domain.") var limit: Int = 512
    @Option(name: .customLong("chat-template"), help: "A Jinja chat template (or chat_template.json) to use instead of the model's.")
    var chatTemplate: String?
    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        try runtime.apply()
        guard let vlm = try ModelRegistry.load(model, chatTemplate: chatTemplate.map { URL(fileURLWithPath: $0) }) as? ComposedVLM else { throw ValidationError("\(model) is not a composed VLM") }
        let domains = try data.map { spec in
            let images = try Dataset.open(spec).items.prefix(limit).compactMap { try $0.image?.load() }
            guard !images.isEmpty else { throw ValidationError("\(spec) has no images") }
            return (name: spec, images: images)
        }
        try vlm.measureVisionSources(domains)
        let dir = model == "default" ? ModelRegistry.defaultModelDir : URL(fileURLWithPath: model)
        let url = dir.appendingPathComponent(ComposedVLM.visionSourceFile)
        let counts = domains.map { "\($0.images.count)" }.joined(separator: " ")
        try saveSafeTensors(try vlm.visionSourceStats(), metadata: ["data": data.joined(separator: " "), "images": counts], to: url)
        print("wrote \(url.path): statistics of \(vlm.encoder.batchNorms.count) batch-norm layers on \(data.joined(separator: ", ")), "
              + "≤ \(limit) images each")
    }
}

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Greedy accuracy of a VLM on a dataset (and maj@N / pass@N with --votes).")

    @Option(help: "A model directory or `default`.") var model: String = "default"
    @Option(help: "fashion-mnist:test, fashion-mnist-c:<shift>:<1-5>, easy-vqa:test, or a .json/.jsonl file.") var data: String
    @Option var limit: Int?
    @Option(help: "Samples per item for maj@N and pass@N (0 = greedy only).") var votes: Int = 0
    @Option(name: .customLong("batch-size"), help: "Prompts per batch (default 16, or the run's with --weights).") var batchSize: Int?
    @Option(name: .customLong("max-tokens"), help: "Default 16, or the run's with --weights.") var maxTokens: Int?
    @Option(help: "strict (a valid option only) or reference (the reference's letter parser); default strict, or the run's.") var answers: String?
    @Option var seed: UInt64 = 0
    @Option(help: "Write the report (accuracy, items, per-item predictions) here.") var json: String?
    @Option(help: "Apply an adaptation run's result first: its directory (weights, vision corrections and eval settings) or an adapted.safetensors file.") var weights: String?
    @Option(name: .customLong("vision-norm"), help: "First match the vision encoder's batch-norm statistics on the first N items' images (unlabelled) to its training data's.") var visionNorm: Int?
    @Option(name: .customLong("chat-template"), help: "A Jinja chat template (or chat_template.json) to use instead of the model's.")
    var chatTemplate: String?
    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        try runtime.apply()
        let vlm = try ModelRegistry.load(model, chatTemplate: chatTemplate.map { URL(fileURLWithPath: $0) })
        var o = EvalOptions()
        if let weights {
            let url = URL(fileURLWithPath: weights)
            eprint("weights: " + (try AdaptedWeights.apply(url, to: vlm)))
            if let run = try AdaptedWeights.runOptions(url) {
                o.maxTokens = run.maxNewTokens
                o.batchSize = run.evalBatch
                o.answerMode = run.answerStyle
            }
        }
        let ds = try Dataset.open(data, seed: seed)
        if let n = visionNorm {
            guard let composed = vlm as? ComposedVLM else { throw ValidationError("--vision-norm needs a composed VLM") }
            guard n >= 1 else { throw ValidationError("--vision-norm must be at least 1") }
            try composed.matchVisionSource(ds.items.prefix(n).compactMap { try $0.image?.load() })
            if let domain = composed.matchedVisionSource, !domain.isEmpty { eprint("vision norm: nearest source \(domain)") }
        }
        o.limit = limit
        o.votes = votes
        if let batchSize { o.batchSize = batchSize }
        if let maxTokens { o.maxTokens = maxTokens }
        if let answers { o.answerMode = try parseStyle(answers) }
        o.seed = seed
        let dist = try Distributed.fromEnvironment()
        let r = try Evaluator.run(vlm, dataset: ds, modelName: model, options: o, distributed: dist)
        guard dist.isMain else { return }
        var line = String(format: "%@: accuracy %.4f on %d items (invalid %.3f), %.1f images/s, %@", ds.name, r.accuracy, r.items,
                          r.invalidShare, r.imagesPerSecond, runtime.precisionLine)
        if let m = r.majAccuracy, let p = r.passAtN, let d = r.majorityDiffersShare {
            line += String(format: ", maj@%d %.4f, pass@%d %.4f, majority ≠ greedy on %.4f", votes, m, votes, p, d)
            if let b = r.balancedMajAccuracy { line += String(format: ", answer-balanced maj@%d %.4f", votes, b) }
        }
        print(line)
        if let json { try writeJSON(r, to: URL(fileURLWithPath: json)) }
    }
}

struct AdaptArguments: ParsableArguments {
    @Option(help: "A model directory or `default`.") var model: String = "default"
    @Option(help: "Unlabelled adaptation data (labels, if present, are used for monitoring only).") var data: String
    @Option(name: .customLong("eval-data"), help: "Evaluation data (default: --data, transductive).") var evalData: String?
    @Option(name: .customLong("adapt-samples")) var adaptSamples: Int = 20
    @Flag(name: .customLong("one-example"), help: "Adapt on the first item only, repeated --adapt-samples times.") var oneExample = false
    @Option var epochs: Int = 2
    @Option(name: .customLong("batch-prompts")) var batchPrompts: Int = 4
    @Option var votes: Int = 32
    @Option(name: .customLong("train-samples")) var trainSamples: Int = 16
    @Option(help: "Learning rate (default 5e-7 in reference mode, else 2e-5).") var lr: Double?
    @Option(name: .customLong("lora-rank"), help: "Add LoRA adapters of this rank to the language model; `lm` then trains them.") var loraRank: Int?
    @Option(help: "Parts to train, comma-separated: vision, vision-norm, projector, lm (its LoRA adapters when it has some), all (every weight). Default: the family's, as the reference trains it; with --one-example the projector alone.") var train: String?
    @Option(name: .customLong("mini-batch-prompts"), help: "Prompts per optimiser update (default: 1 in reference mode, the whole step otherwise).") var miniBatchPrompts: Int?
    @Option(name: .customLong("checkpoint-every"), help: "Checkpoint every N steps (default: every step when small, else every 5; the last step always).") var checkpointEvery: Int?
    @Option(help: "frequency or majority.") var reward: String = "frequency"
    @Option(name: .customLong("entropy-coef")) var entropyCoef: Double = 0.75
    @Option(name: .customLong("answer-balance"), help: "Divide each answer's votes by how often the policy gives that answer across the adaptation images, to this power (0 = off, the reference's reward).")
    var answerBalance: Double = 0
    @Option(help: "group or batch advantage normalisation (default: group in reference mode, batch otherwise).") var advantage: String?
    @Option(help: "reference or default.") var mode: String = "default"
    @Option(name: .customLong("max-new-tokens")) var maxNewTokens: Int = 8
    @Option(name: .customLong("kl-coef")) var klCoef: Double = 0.001
    @Option(name: .customLong("eval-limit")) var evalLimit: Int?
    @Option(name: .customLong("eval-votes"), help: "Also sample N replies per evaluation item for maj@N and pass@N (0 = greedy only).") var evalVotes: Int = 0
    @Option var seed: UInt64 = 0
    @Flag(inversion: .prefixedNo, help: "First match the vision encoder's batch-norm statistics on the adaptation images to its training data's (default: on in default mode when the model has them, see `ttrv calibrate`).") var visionNorm: Bool?
    @Flag(name: .customLong("eval-after-norm"), help: "Also evaluate after the vision batch-norm matching, before the RL steps (the report then separates the two gains).") var evalAfterNorm = false
    @Option(help: "Output directory (logs, checkpoints, adapted weights, report). Re-running resumes.") var out: String = "runs/adapt"
    @Option(name: .customLong("chat-template"), help: "A Jinja chat template (or chat_template.json) to use instead of the model's.")
    var chatTemplate: String?

    func options() throws -> AdaptOptions {
        var o = AdaptOptions()
        guard let m = AdaptMode(rawValue: mode) else { throw ValidationError("--mode must be reference or default") }
        guard let r = RewardKind(rawValue: reward) else { throw ValidationError("--reward must be frequency or majority") }
        o.mode = m
        o.reward = r
        if let a = advantage {
            guard let v = AdvantageNorm(rawValue: a) else { throw ValidationError("--advantage must be group or batch") }
            o.advantage = v
        }
        guard votes >= 2, trainSamples >= 2, trainSamples <= votes else { throw ValidationError("need 2 <= --train-samples <= --votes") }
        guard batchPrompts >= 1, adaptSamples >= batchPrompts, epochs >= 1 else { throw ValidationError("need --adapt-samples >= --batch-prompts >= 1 and --epochs >= 1") }
        o.adaptSamples = adaptSamples
        o.oneExample = oneExample
        o.epochs = epochs
        o.batchPrompts = batchPrompts
        o.votes = votes
        o.trainSamples = trainSamples
        o.lr = lr
        o.loraRank = loraRank
        o.train = try train.map(parseParts)
        if let m = miniBatchPrompts {
            guard m >= 1 else { throw ValidationError("--mini-batch-prompts must be at least 1") }
            o.miniBatchPrompts = m
        }
        if let c = checkpointEvery {
            guard c >= 1 else { throw ValidationError("--checkpoint-every must be at least 1") }
            o.checkpointEvery = c
        }
        if let r = loraRank, r < 1 { throw ValidationError("--lora-rank must be at least 1") }
        o.entropyCoef = entropyCoef
        guard answerBalance >= 0, answerBalance.isFinite else { throw ValidationError("--answer-balance must be >= 0") }
        o.answerBalance = answerBalance
        o.maxNewTokens = maxNewTokens
        o.klCoef = klCoef
        o.evalLimit = evalLimit
        guard evalVotes >= 0 else { throw ValidationError("--eval-votes must be >= 0") }
        o.evalVotes = evalVotes
        o.seed = seed
        o.visionNorm = visionNorm
        o.evalAfterNorm = evalAfterNorm
        return o
    }
}

func parseParts(_ s: String) throws -> [ModelPart] {
    return try s.split(separator: ",").map {
        guard let p = ModelPart(rawValue: String($0)) else {
            throw ValidationError("--train: unknown part '\($0)' (\(ModelPart.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        return p
    }
}

func runAdapt(_ a: AdaptArguments, precision: String) throws -> AdaptReport {
    let options = try a.options()
    let vlm = try ModelRegistry.load(a.model, chatTemplate: a.chatTemplate.map { URL(fileURLWithPath: $0) })
    let data = try Dataset.open(a.data, seed: a.seed)
    let evalData = try a.evalData.map { try Dataset.open($0, seed: a.seed) } ?? data
    let dist = try Distributed.fromEnvironment()
    let adapter = try Adapter(vlm: vlm, options: options, out: URL(fileURLWithPath: a.out), distributed: dist, log: eprint)
    adapter.command = CommandLine.arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
    if dist.isMain {
        eprint("adapt: \(options.mode.rawValue) mode, training \(adapter.trainedParts.map(\.rawValue).joined(separator: "+")) "
               + "(\(adapter.trainableCount) parameters), lr \(options.resolvedLR), advantage \(options.resolvedAdvantage.rawValue), "
               + "\(options.resolvedMiniBatch) prompt(s) per update"
               + (dist.worldSize > 1 ? ", \(dist.worldSize) processes" : "") + ", " + precision)
    }
    let r = try adapter.run(adaptData: data, evalData: evalData, modelName: a.model)
    guard dist.isMain else { return r }
    if let n = r.accuracyAfterNorm {
        print(String(format: "vision-norm matching %+.1f points, RL steps %+.1f points", 100 * (n - r.accuracyBefore),
                     100 * (r.accuracyAfter - n)))
    }
    print(String(format: "accuracy before %.4f → after %.4f (%+.1f points) on %d items; %d steps, %.0f s%@",
                 r.accuracyBefore, r.accuracyAfter, 100 * (r.accuracyAfter - r.accuracyBefore), r.evalItems, r.steps, r.seconds,
                 r.stoppedEarly.map { "; stopped early: \($0)" } ?? ""))
    print("report: \(a.out)/report.html")
    return r
}

struct Adapt: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Label-free test-time RL (TTRV), with evaluation before and after.")
    @OptionGroup var args: AdaptArguments
    @OptionGroup var runtime: RuntimeOptions
    func run() throws {
        try runtime.apply()
        _ = try runAdapt(args, precision: runtime.precisionLine)
    }
}

struct Align: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Supervised warm-start of a composed VLM (projector and optional LoRA).")
    @Option(help: "Training data (labelled).") var data: String = "fashion-mnist:train"
    @Option(name: .customLong("eval-data")) var evalData: String = "fashion-mnist:test"
    @Option(help: "Start from this model directory instead of a fresh composition.") var model: String?
    @Option(name: .customLong("image-size")) var imageSize: Int = 112
    @Option(name: .customLong("lora-rank")) var loraRank: Int?
    @Option var steps: Int = 300
    @Option(name: .customLong("batch-size")) var batchSize: Int = 8
    @Option var lr: Double = 1e-3
    @Option(name: .customLong("eval-every")) var evalEvery: Int = 100
    @Option(help: "What the reply is trained to be: letter or option-text.") var target: String = "letter"
    @Option(name: .customLong("prealign-steps"), help: "Projector-only first stage on class-name embeddings (needs class labels).") var prealignSteps: Int = 0
    @Option(name: .customLong("eval-limit")) var evalLimit: Int = 200
    @Option var seed: UInt64 = 0
    @Option(help: "Model directory to write.") var out: String = "runs/aligned"
    @Option(name: .customLong("chat-template"), help: "A Jinja chat template (or chat_template.json) to use instead of the model's.")
    var chatTemplate: String?
    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        try runtime.apply()
        let vlm: ComposedVLM
        if let model { vlm = try ComposedVLM.load(URL(fileURLWithPath: model)) } else {
            var c = ComposedConfig()
            c.imageSize = imageSize
            c.loraRank = loraRank
            vlm = try ComposedVLM.create(c, seed: seed)
        }
        if let t = chatTemplate { try ModelRegistry.useTemplate(URL(fileURLWithPath: t), for: vlm) }
        var o = AlignOptions()
        o.steps = steps
        o.batchSize = batchSize
        o.lr = lr
        o.evalEvery = evalEvery
        o.evalLimit = evalLimit
        o.seed = seed
        o.prealignSteps = prealignSteps
        guard let t = AlignTarget(rawValue: target) else { throw ValidationError("--target must be letter or option-text") }
        o.target = t
        let t0 = Date()
        let dist = try Distributed.fromEnvironment()
        let r = try Aligner.run(vlm, train: try Dataset.open(data, seed: seed), eval: try Dataset.open(evalData, seed: seed), options: o,
                                out: URL(fileURLWithPath: out), distributed: dist, log: dist.isMain ? eprint : { _ in })
        guard dist.isMain else { return }
        print(String(format: "aligned in %.0f s: held-out accuracy %.4f on %d items; wrote %@", Date().timeIntervalSince(t0), r.accuracy, r.items, out))
    }
}

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The main job on the embedded default model: adapt on 20 unlabelled shifted Fashion-MNIST test images, evaluate on 500.")
    @Option var data: String = "fashion-mnist-c:contrast:5"
    @Option(name: .customLong("eval-limit")) var evalLimit: Int = 500
    @Option var out: String = "runs/demo"
    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        try runtime.apply()
        // The default VLM already carries LoRA adapters; adapting them (and the projector) keeps
        // the demo within its time budget on 2 cores.
        // Evaluating between the matching and the RL steps shows each one's own contribution.
        var a = try AdaptArguments.parse(["--data", data, "--eval-limit", "\(evalLimit)", "--out", out, "--eval-after-norm"])
        a.model = "default"
        let r = try runAdapt(a, precision: runtime.precisionLine)
        let steps = "\(r.steps) RL steps on \(r.adaptItems) unlabelled images"
        if let norm = r.accuracyAfterNorm {
            print(String(format: "\nDEMO  base %.1f%%  →  vision-norm matching %.1f%%  →  + %@ %.1f%%  (%d test images)",
                         100 * r.accuracyBefore, 100 * norm, steps, 100 * r.accuracyAfter, r.evalItems))
        } else {
            print(String(format: "\nDEMO  base %.1f%%  →  %@ %.1f%%  (%d test images)", 100 * r.accuracyBefore, steps,
                         100 * r.accuracyAfter, r.evalItems))
        }
    }
}

extension Precision: ExpressibleByArgument {}

struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "HTML report: one adapt run, one eval JSON, or several runs compared (with a CSV).",
        discussion: "A run directory (ttrv adapt --out) gives its page (report.html, rebuilt); an eval JSON (ttrv eval --json) gives per-class accuracy, the confusion matrix and examples; several run directories give one page comparing them, seeds of the same configuration grouped into mean ± std, and a CSV next to it.")
    @Argument(help: "Run directories or one eval JSON.") var inputs: [String]
    @Option(help: "The HTML file to write (default: RUN_DIR/report.html, EVAL.html, or comparison.html); the CSV goes next to it.") var out: String?

    func run() throws {
        for url in try Reports.build(inputs: inputs, out: out) { print("wrote \(url.path)") }
    }
}

struct Launch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a ttrv command on N worker processes per machine (the torchrun way; node 0 hosts the store).",
        discussion: "ttrv launch --nproc 2 -- eval --data fashion-mnist:test --json out.json")
    @Option(help: "Worker processes on this machine.") var nproc: Int = 1
    @Option(help: "Machines in the job.") var nnodes: Int = 1
    @Option(name: .customLong("node-rank"), help: "This machine's index (0 hosts the store).") var nodeRank: Int = 0
    @Option(help: "ADDR:PORT of node 0, reachable from every machine (default: 127.0.0.1 and a free port).")
    var master: String?
    @Option(help: "libtorch threads per worker (default: cores / nproc).") var threads: Int?
    @Option(help: "Seconds a rendezvous or collective may take before the job fails.") var timeout: Double = 600
    @Argument(parsing: .postTerminator, help: "The ttrv command and its arguments, after --.") var command: [String] = []

    func run() throws {
        var o = LaunchOptions(nproc: nproc)
        o.nnodes = nnodes
        o.nodeRank = nodeRank
        o.threadsPerWorker = threads
        o.timeout = timeout
        if let master {
            guard let colon = master.lastIndex(of: ":"), let port = Int(master[master.index(after: colon)...]),
                  (1..<65536).contains(port), colon != master.startIndex else {
                throw ValidationError("--master must be ADDR:PORT, got \(master)")
            }
            o.masterAddress = String(master[..<colon])
            o.masterPort = port
        }
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        try Launcher(options: o, executable: exe, arguments: command).run()
    }
}

struct DistBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dist-bench",
        abstract: "Time an allreduce between the processes of a job (under ttrv launch); also a connectivity check.")
    @Option(help: "Floats per allreduce.") var floats: Int = 1_000_000
    @Option var iterations: Int = 10
    @Option(help: "Rank 0 writes the median seconds here (JSON).") var json: String?
    @OptionGroup var runtime: RuntimeOptions

    func run() throws {
        try runtime.apply()
        let d = try Distributed.fromEnvironment()
        eprint("dist-bench: rank \(d.rank) of \(d.worldSize) connected")
        let median = try Bench.allreduceMedianSeconds(d, floats: floats, iterations: iterations)
        guard d.isMain else { return }
        print(String(format: "allreduce of %d floats across %d processes: median %.6f s (%d iterations)",
                     floats, d.worldSize, median, iterations))
        if let json { try writeJSON(["allreduce_seconds": median], to: URL(fileURLWithPath: json)) }
    }
}
