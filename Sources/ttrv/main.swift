import ArgumentParser
import Foundation
import Models
import TTRV
import Torch

@main
struct TTRVCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ttrv",
        abstract: "Test-time reinforcement learning for vision-language models.",
        subcommands: [Generate.self, BenchCommand.self]
    )
}

/// Options every command that runs a model shares.
struct RuntimeOptions: ParsableArguments {
    @Option(help: "Threads for libtorch (default: all cores).")
    var threads: Int?

    func apply() {
        LibTorch.threads = threads ?? ProcessInfo.processInfo.activeProcessorCount
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
    @OptionGroup var runtime: RuntimeOptions

    func validate() throws {
        guard samples >= 1 else { throw ValidationError("--samples must be at least 1") }
        guard maxTokens >= 1 else { throw ValidationError("--max-tokens must be at least 1") }
        guard (0...1).contains(topP), topP > 0 else { throw ValidationError("--top-p must be in (0, 1]") }
        guard temperature >= 0 else { throw ValidationError("--temperature must be >= 0") }
    }

    func run() throws {
        runtime.apply()
        let lm = try LMLoader.load(try resolveLM(model))
        var messages: [ChatMessage] = []
        if let system { messages.append(.system(system)) }
        messages.append(.user(prompt))
        let text = raw ? prompt : lm.template.render(messages, addGenerationPrompt: true)
        let ids = lm.tokenizer.encode(text)
        let gen = TextGenerator(lm: lm.model, tokenizer: lm.tokenizer, stopIds: lm.stopIds)
        let params = SamplingParams(temperature: temperature, topP: topP, topK: topK, maxTokens: maxTokens, seed: seed)
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
    @Option(help: "Which groups to run: foundation, generate.") var only: [String] = []
    @Option(help: "Threads (the reference pins 2).") var threads: Int = 2

    func run() throws {
        LibTorch.threads = threads
        let want = { (g: String) in only.isEmpty || only.contains(g) }
        var entries: [BenchEntry] = []
        func add(_ name: String, _ value: Double, _ unit: String) {
            entries.append(BenchEntry(name: name, value: value, unit: unit))
            eprint(String(format: "%-34@ %12.2f %@", name as NSString, value, unit))
        }
        if want("foundation") {
            add("matmul_1024_gflops", try Bench.matmul(m: 1024, k: 1024, n: 1024), "GFLOP/s")
            add("matmul_4096x1024x1024_gflops", try Bench.matmul(m: 4096, k: 1024, n: 1024), "GFLOP/s")
            let (f, fb) = try Bench.blockStack()
            add("llama12_forward_ms", f * 1000, "ms")
            add("llama12_forward_backward_ms", fb * 1000, "ms")
        }
        var peer: [String: Double] = [:]
        if want("generate") {
            let url = LMLoader.defaultLMPath()
            let lm = try LMLoader.load(url)
            let g = try Bench.generation(lm)
            eprint("prompt: \(g.promptTokens) tokens")
            add("prefill_tokens_per_s", g.prefillTokensPerS, "tok/s")
            add("decode_batch1_tokens_per_s", g.decodeBatch1TokensPerS, "tok/s")
            add("decode_batch32_tokens_per_s", g.decodeBatch32TokensPerS, "tok/s")
            add("fanout32_tokens_per_s", g.fanout32TokensPerS, "tok/s")
            peer.merge(Bench.peer(mode: "generate", gguf: url, log: eprint)) { a, _ in a }
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
