import Foundation
import TTRV

// Thin driver over TTRV.FuzzEntry. Built with `-sanitize=fuzzer` and `-DFUZZING` (make fuzz),
// libFuzzer supplies main and calls LLVMFuzzerTestOneInput with the target in $TTRV_FUZZ_TARGET.
// Built plainly it is a replay tool: `ttrv-fuzz TARGET FILE...` parses each file and prints one
// line per file, which is also how the tests load hostile files in a memory-limited child. With
// `--rss` each line also gives the growth of peak resident memory while parsing that file (Linux).

private let fuzzTarget: String = {
    let name = ProcessInfo.processInfo.environment["TTRV_FUZZ_TARGET"] ?? ""
    guard FuzzEntry.targets.contains(name) else {
        FileHandle.standardError.write(Data("TTRV_FUZZ_TARGET must be one of \(FuzzEntry.targets)\n".utf8))
        exit(2)
    }
    return name
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ bytes: UnsafePointer<UInt8>?, _ count: Int) -> Int32 {
    let data = bytes.map { Data(bytes: $0, count: count) } ?? Data()
    FuzzEntry.run(fuzzTarget, data)
    return 0
}

#if !FUZZING
@main
enum Replay {
    static func main() {
        var args = Array(CommandLine.arguments.dropFirst())
        let rss = args.first == "--rss"
        if rss { args.removeFirst() }
        guard let target = args.first, FuzzEntry.targets.contains(target), args.count > 1 else {
            print("usage: ttrv-fuzz TARGET FILE...   (targets: \(FuzzEntry.targets.joined(separator: ", ")))")
            exit(2)
        }
        for path in args.dropFirst() {
            guard let data = FileManager.default.contents(atPath: path) else {
                print("\(path): cannot read")
                exit(1)
            }
            let before = rss ? resetPeakRSS() : 0
            let outcome = FuzzEntry.run(target, data, url: URL(fileURLWithPath: path))
            let growth = rss ? " (peak +\(max(0, statusKB("VmHWM") - before)) kB)" : ""
            print("\(path): \(outcome.map { "error: \($0)" } ?? "ok")\(growth)")
        }
    }
}

/// Resets the peak resident size to the current one (Linux's clear_refs "5") and returns it in kB.
private func resetPeakRSS() -> Int {
    if let handle = FileHandle(forWritingAtPath: "/proc/self/clear_refs") {
        handle.write(Data("5".utf8))
        handle.closeFile()
    }
    return statusKB("VmRSS")
}

/// A "kB" line of /proc/self/status, 0 where there is none.
private func statusKB(_ key: String) -> Int {
    let status = (try? String(contentsOfFile: "/proc/self/status", encoding: .utf8)) ?? ""
    let line = status.split(separator: "\n").first { $0.hasPrefix(key + ":") } ?? ""
    return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
}
#endif
