import Foundation

/// One line of adapt_log.jsonl as the report reads it. Every metric is optional so that logs
/// written by older and newer versions of `ttrv adapt` both load.
public struct StepRecord: Decodable, Sendable {
    public var step: Int
    public var rewardMean, rewardStd, majorityRatio, invalidShare, answerEntropy, responseLength: Double?
    public var kl, clipFraction, gradNorm, lr, labelAccuracy, ratioMaxAbsLog: Double?
    public var seconds, rolloutSeconds, oldRefSeconds, trainSeconds, optimizerSeconds: Double?

    enum CodingKeys: String, CodingKey {
        case step, rewardMean = "reward_mean", rewardStd = "reward_std", majorityRatio = "majority_ratio"
        case invalidShare = "invalid_share", answerEntropy = "answer_entropy", responseLength = "response_length"
        case kl, clipFraction = "clip_fraction", gradNorm = "grad_norm", lr, labelAccuracy = "label_accuracy"
        case ratioMaxAbsLog = "ratio_max_abs_log", seconds, rolloutSeconds = "rollout_s"
        case oldRefSeconds = "old_ref_logprob_s", trainSeconds = "fwd_bwd_s", optimizerSeconds = "optimizer_s"
    }
}

/// The files one `ttrv adapt --out DIR` run leaves: report.json, eval_before.json,
/// eval_after.json and adapt_log.jsonl.
public struct RunFiles: Sendable {
    public var name: String
    /// Where the files are (nil for a run held only in memory).
    public var directory: URL?
    public var report: AdaptReport
    public var before: EvalReport
    public var after: EvalReport
    public var steps: [StepRecord]

    public static func load(_ dir: URL) throws -> RunFiles {
        let report = try readJSON(AdaptReport.self, dir.appendingPathComponent("report.json"), what: "a `ttrv adapt` report")
        let before = try readJSON(EvalReport.self, dir.appendingPathComponent("eval_before.json"), what: "an eval report")
        let after = try readJSON(EvalReport.self, dir.appendingPathComponent("eval_after.json"), what: "an eval report")
        let logURL = dir.appendingPathComponent("adapt_log.jsonl")
        let steps = FileManager.default.fileExists(atPath: logURL.path) ? try readLog(logURL) : try records(report.log)
        return RunFiles(name: dir.standardizedFileURL.lastPathComponent, directory: dir.standardizedFileURL, report: report,
                        before: before, after: after, steps: steps)
    }

    static func readLog(_ url: URL) throws -> [StepRecord] {
        let text: String
        do { text = try String(contentsOf: url, encoding: .utf8) } catch {
            throw DatasetError(message: "\(url.path): unreadable (\(error.localizedDescription))")
        }
        return try text.split(separator: "\n").enumerated().map { i, line in
            do { return try JSONDecoder().decode(StepRecord.self, from: Data(line.utf8)) } catch {
                throw DatasetError(message: "\(url.path): line \(i + 1) is not a step log entry (\(describe(error)))")
            }
        }
    }

    /// The report's own log, read through the same lenient view.
    static func records(_ log: [StepLog]) throws -> [StepRecord] {
        try JSONDecoder().decode([StepRecord].self, from: JSONEncoder().encode(log))
    }
}

func readJSON<T: Decodable>(_ type: T.Type, _ url: URL, what: String) throws -> T {
    guard let data = FileManager.default.contents(atPath: url.path) else {
        throw DatasetError(message: "\(url.path): no such file")
    }
    do { return try JSONDecoder().decode(type, from: data) } catch {
        throw DatasetError(message: "\(url.path): not \(what) (\(describe(error)))")
    }
}

func describe(_ error: Error) -> String {
    guard let e = error as? DecodingError else { return "\(error)" }
    func path(_ c: DecodingError.Context) -> String {
        c.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
    }
    switch e {
    case .keyNotFound(let key, let c): return "missing \"\(key.stringValue)\" at \(path(c).isEmpty ? "top level" : path(c))"
    case .typeMismatch(_, let c), .valueNotFound(_, let c): return "wrong type at \(path(c)): \(c.debugDescription)"
    case .dataCorrupted(let c): return c.debugDescription
    @unknown default: return "\(e)"
    }
}

/// Self-contained HTML pages (inline SVG and PNG, no scripts, no network).
public enum HTMLReport {
    /// The page `ttrv adapt` writes next to its report.json.
    public static func write(_ r: AdaptReport, before: EvalReport, after: EvalReport, to url: URL) throws {
        let dir = url.deletingLastPathComponent()
        let run = RunFiles(name: dir.lastPathComponent, directory: dir, report: r, before: before, after: after,
                           steps: try RunFiles.records(r.log))
        try writeAtomically(runPage(run), to: url)
    }

    // MARK: one run

    public static func runPage(_ run: RunFiles) -> String {
        let r = run.report, o = r.options
        var h = "<h1>Test-time RL: \(esc(r.model)) on \(esc(r.dataset))</h1>\n"
        h += "<p>Adapted on <b>\(r.adaptItems)</b> unlabelled items of <code>\(esc(r.dataset))</code> for <b>\(r.steps)</b> steps "
        h += "(\(String(format: "%.0f", r.seconds)) s, mode <code>\(r.mode.rawValue)</code>); evaluated on \(r.evalItems) items of "
        h += "<code>\(esc(r.evalDataset))</code>. Trained: \(r.trainedParts.map(\.rawValue).joined(separator: ", ")) "
        h += "(\(r.trainableParameters) parameters)."
        if r.visionNorm { h += " Vision batch-norm statistics were matched to the source before the RL steps." }
        if let n = r.accuracyAfterNorm {
            h += String(format: " Greedy accuracy after the matching alone: <b>%.1f%%</b> (matching %@, RL steps %@).",
                        100 * n, signedPoints(n - r.accuracyBefore), signedPoints(r.accuracyAfter - n))
        }
        if let s = r.stoppedEarly { h += " <b class=\"bad\">Stopped early</b>: \(esc(s))." }
        h += "</p>\n" + summaryTable(before: run.before, after: run.after)
        let classes = ClassTable(before: run.before.predictions, after: run.after.predictions)
        h += "<h2>Accuracy</h2><div class=\"charts\">\n" + accuracyChart(before: run.before, after: run.after)
        h += classes.accuracyChart() + "</div>\n"
        h += "<h2>Steps</h2><div class=\"charts\">\n" + stepCharts(run.steps) + "</div>\n"
        h += "<h2>Classes</h2><div class=\"charts\">\n" + classes.confusion(after: false) + classes.confusion(after: true)
        h += "</div>\n" + classes.table()
        h += "<h2>Examples</h2>\n" + examples(before: run.before.predictions, after: run.after.predictions)
        h += "<h2>Step log</h2>\n" + stepTable(run.steps)
        h += "<h2>Options</h2>\n"
        if let c = r.command { h += "<p>Command line:</p><pre>\(esc(c))</pre>\n" }
        h += "<p>\(r.command == nil ? "Reproduce with" : "Equivalent, every flag spelt out"):</p>"
        h += "<pre>\(esc(adaptCommand(r, out: run.directory?.path ?? run.name)))</pre>\n" + optionsTable(o)
        return page(title: "ttrv adapt — \(r.dataset)", body: h)
    }

    static func summaryTable(before: EvalReport, after: EvalReport?) -> String {
        let pct = { (x: Double?) in x.map { String(format: "%.1f%%", 100 * $0) } ?? "–" }
        let cols = after == nil ? [before] : [before, after!]
        var h = "<table class=\"nums\"><tr><th></th>"
        h += after == nil ? "<th>value</th>" : "<th>before</th><th>after</th><th>change</th>"
        h += "</tr>\n"
        func row(_ name: String, _ f: (EvalReport) -> Double?, lowerIsBetter: Bool = false) {
            h += "<tr><td>\(esc(name))</td>" + cols.map { "<td>\(pct(f($0)))</td>" }.joined()
            if let a = after, let x = f(before), let y = f(a) {
                h += "<td>" + signedPoints(y - x, lowerIsBetter: lowerIsBetter) + "</td>"
            } else if after != nil {
                h += "<td>–</td>"
            }
            h += "</tr>\n"
        }
        row("greedy accuracy", \.accuracy)
        row(before.votes > 0 ? "maj@\(before.votes) accuracy" : "maj@N accuracy (eval had no --votes)", \.majAccuracy)
        row(before.votes > 0 ? "pass@\(before.votes)" : "pass@N", \.passAtN)
        row("answer-balanced maj@N accuracy", \.balancedMajAccuracy)
        row("majority ≠ greedy answer", \.majorityDiffersShare)
        row("invalid greedy replies", \.invalidShare, lowerIsBetter: true)
        h += "<tr><td>items</td>" + cols.map { "<td>\($0.items)</td>" }.joined() + (after == nil ? "" : "<td></td>") + "</tr>\n"
        h += "<tr><td>eval speed</td>" + cols.map { String(format: "<td>%.1f img/s</td>", $0.imagesPerSecond) }.joined()
        return h + (after == nil ? "" : "<td></td>") + "</tr></table>\n"
    }

    static func signedPoints(_ d: Double, lowerIsBetter: Bool = false) -> String {
        let s = String(format: "%+.1f pt", 100 * d)
        let better = lowerIsBetter ? -d : d
        return better > 0.0005 ? "<span class=\"good\">\(s)</span>" : better < -0.0005 ? "<span class=\"bad\">\(s)</span>" : s
    }

    static func accuracyChart(before: EvalReport, after: EvalReport) -> String {
        var labels = ["greedy accuracy"], b = [before.accuracy], a = [after.accuracy]
        if let x = before.majAccuracy, let y = after.majAccuracy {
            labels.append("maj@\(before.votes) accuracy")
            b.append(x)
            a.append(y)
        }
        labels.append("invalid replies")
        b.append(before.invalidShare)
        a.append(after.invalidShare)
        return Chart.bars(title: "Accuracy before / after adaptation", valueLabel: "share of eval items (%)", labels: labels,
                          series: [.init("before", b.map { 100 * $0 }, color: Chart.before),
                                   .init("after", a.map { 100 * $0 }, color: Chart.after)],
                          ceiling: 100, format: { String(format: "%.1f", $0) })
    }

    static func stepCharts(_ steps: [StepRecord]) -> String {
        let x = steps.map { Double($0.step + 1) }
        func v(_ k: KeyPath<StepRecord, Double?>) -> [Double] { steps.map { $0[keyPath: k] ?? .nan } }
        func has(_ k: KeyPath<StepRecord, Double?>) -> Bool { steps.contains { $0[keyPath: k]?.isFinite == true } }
        let p = Chart.palette
        var charts = [
            Chart.lines(title: "Reward (mean ± std over votes)", xLabel: "step", yLabel: "reward", x: x,
                        series: [.init("reward mean", v(\.rewardMean), color: p[0], spread: v(\.rewardStd))]),
            Chart.lines(title: "Votes", xLabel: "step", yLabel: "share / normalised entropy", x: x,
                        series: [.init("majority ratio", v(\.majorityRatio), color: p[1]),
                                 .init("invalid share", v(\.invalidShare), color: p[3]),
                                 .init("answer entropy", v(\.answerEntropy), color: p[4]),
                                 .init("label acc. of majority (monitor only)", v(\.labelAccuracy), color: p[2], dashed: true)],
                        yFloor: 0, yCeiling: 1),
            Chart.lines(title: "KL to the starting model", xLabel: "step", yLabel: "low-variance KL", x: x,
                        series: [.init("KL", v(\.kl), color: p[4])], yFloor: 0),
            Chart.lines(title: "Clip fraction", xLabel: "step", yLabel: "share of tokens clipped", x: x,
                        series: [.init("clip fraction", v(\.clipFraction), color: p[5])], yFloor: 0),
        ]
        if has(\.ratioMaxAbsLog) {
            charts.append(Chart.lines(title: "Policy ratio", xLabel: "step", yLabel: "max |log ratio|", x: x,
                                      series: [.init("max |log π/π_old|", v(\.ratioMaxAbsLog), color: p[6])], yFloor: 0))
        }
        charts += [
            Chart.lines(title: "Gradient norm (before clipping)", xLabel: "step", yLabel: "L2 norm", x: x,
                        series: [.init("grad norm", v(\.gradNorm), color: p[7])], yFloor: 0),
            Chart.lines(title: "Learning rate", xLabel: "step", yLabel: "lr", x: x,
                        series: [.init("lr", v(\.lr), color: p[0])], yFloor: 0),
            Chart.lines(title: "Response length", xLabel: "step", yLabel: "tokens per reply", x: x,
                        series: [.init("mean length", v(\.responseLength), color: p[1])], yFloor: 0),
            timeChart(steps),
        ]
        return charts.joined(separator: "\n")
    }

    static func timeChart(_ steps: [StepRecord]) -> String {
        let parts: [(String, KeyPath<StepRecord, Double?>)] = [
            ("rollout", \.rolloutSeconds), ("old/ref log-probs", \.oldRefSeconds), ("forward+backward", \.trainSeconds),
            ("optimiser", \.optimizerSeconds),
        ]
        var series = parts.enumerated().map { k, part in
            Chart.Series(part.0, steps.map { $0[keyPath: part.1] ?? 0 }, color: Chart.palette[k])
        }
        let other = steps.map { s in max(0, (s.seconds ?? 0) - parts.map { s[keyPath: $0.1] ?? 0 }.reduce(0, +)) }
        series.append(.init("other", other, color: "#8c8c8c"))
        return Chart.stacked(title: "Time per step", xLabel: "step", yLabel: "seconds",
                             categories: steps.map { "\($0.step + 1)" }, parts: series)
    }

    static func stepTable(_ steps: [StepRecord]) -> String {
        let cols: [(String, KeyPath<StepRecord, Double?>, String)] = [
            ("reward", \.rewardMean, "%.3f"), ("± std", \.rewardStd, "%.3f"), ("majority", \.majorityRatio, "%.3f"),
            ("invalid", \.invalidShare, "%.3f"), ("entropy", \.answerEntropy, "%.3f"), ("length", \.responseLength, "%.2f"),
            ("KL", \.kl, "%.2e"), ("clip", \.clipFraction, "%.3f"), ("max |log ratio|", \.ratioMaxAbsLog, "%.2e"),
            ("grad norm", \.gradNorm, "%.3f"), ("lr", \.lr, "%.1e"), ("label acc.", \.labelAccuracy, "%.2f"),
            ("seconds", \.seconds, "%.1f"),
        ].filter { c in steps.contains { $0[keyPath: c.1] != nil } }
        var h = "<table class=\"nums\"><tr><th>step</th>" + cols.map { "<th>\(esc($0.0))</th>" }.joined() + "</tr>\n"
        for s in steps {
            h += "<tr><td>\(s.step + 1)</td>" + cols.map { c in
                "<td>" + (s[keyPath: c.1].map { String(format: c.2, $0) } ?? "–") + "</td>"
            }.joined() + "</tr>\n"
        }
        return h + "</table>\n<p class=\"muted\">Labels are never used for training; label accuracy is shown for "
            + "monitoring only.</p>\n"
    }

    // MARK: options

    /// Every option field (name, value), from the struct itself so that new options show up.
    static func optionFields(_ o: AdaptOptions) -> [(String, String)] {
        Mirror(reflecting: o).children.compactMap { child in
            guard let name = child.label else { return nil }
            return (name, optionValue(child.value))
        }
    }

    static func optionValue(_ v: Any) -> String {
        let m = Mirror(reflecting: v)
        if m.displayStyle == .optional { return m.children.first.map { optionValue($0.value) } ?? "default" }
        if m.displayStyle == .collection { return m.children.map { optionValue($0.value) }.joined(separator: ",") }
        if let e = v as? any RawRepresentable, let raw = e.rawValue as? String { return raw }
        return "\(v)"
    }

    static func optionsTable(_ o: AdaptOptions) -> String {
        var h = "<table class=\"opts\"><tr><th>option</th><th>value</th><th>option</th><th>value</th></tr>\n"
        let fields = optionFields(o) + [("resolved lr", "\(o.resolvedLR)"), ("resolved advantage", o.resolvedAdvantage.rawValue)]
        for i in stride(from: 0, to: fields.count, by: 2) {
            let pair = fields[i..<min(fields.count, i + 2)].map { "<td>\(esc($0.0))</td><td><code>\(esc($0.1))</code></td>" }
            h += "<tr>" + pair.joined() + "</tr>\n"
        }
        return h + "</table>\n"
    }

    /// The `ttrv adapt` command line that reproduces the run (options without a flag are at their defaults).
    static func adaptCommand(_ r: AdaptReport, out: String) -> String {
        let o = r.options
        var a = ["ttrv", "adapt", "--model", r.model, "--data", r.dataset]
        if r.evalDataset != r.dataset { a += ["--eval-data", r.evalDataset] }
        a += ["--mode", o.mode.rawValue, "--adapt-samples", "\(o.adaptSamples)"]
        if o.oneExample { a.append("--one-example") }
        a += ["--epochs", "\(o.epochs)", "--batch-prompts", "\(o.batchPrompts)", "--votes", "\(o.votes)",
              "--train-samples", "\(o.trainSamples)"]
        if let lr = o.lr { a += ["--lr", "\(lr)"] }
        if let rank = o.loraRank { a += ["--lora-rank", "\(rank)"] }
        if let parts = o.train { a += ["--train", parts.map(\.rawValue).joined(separator: ",")] }
        if let m = o.miniBatchPrompts { a += ["--mini-batch-prompts", "\(m)"] }
        if let c = o.checkpointEvery { a += ["--checkpoint-every", "\(c)"] }
        a += ["--reward", o.reward.rawValue, "--entropy-coef", "\(o.entropyCoef)"]
        if let adv = o.advantage { a += ["--advantage", adv.rawValue] }
        if o.answerBalance != 0 { a += ["--answer-balance", "\(o.answerBalance)"] }
        a += ["--max-new-tokens", "\(o.maxNewTokens)", "--kl-coef", "\(o.klCoef)"]
        if let n = o.evalLimit { a += ["--eval-limit", "\(n)"] }
        a += ["--seed", "\(o.seed)"]
        if let vn = o.visionNorm { a.append(vn ? "--vision-norm" : "--no-vision-norm") }
        a += ["--out", out]
        return a.map(shellQuote).joined(separator: " ")
    }

    static func shellQuote(_ s: String) -> String {
        s.allSatisfy({ $0.isLetter || $0.isNumber || "-_.:/=+@,".contains($0) }) && !s.isEmpty
            ? s : "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }

    // MARK: examples

    /// A grid of items with their thumbnails, options and answers; items whose answer changed first.
    static func examples(before: [ItemPrediction], after: [ItemPrediction]?, limit: Int = 24) -> String {
        let picked = pickExamples(before: before, after: after, limit: limit)
        if picked.isEmpty { return "<p class=\"muted\">No items.</p>\n" }
        var h = "<p class=\"muted\">Options: <span class=\"pb\">blue</span> = greedy answer "
        h += after == nil ? "" : "before, <span class=\"pa\">orange</span> = after, "
        h += "<span class=\"lab\">★</span> = label (monitoring only).</p>\n<div class=\"grid\">\n"
        for (b, a, kind) in picked { h += card(b, a, kind: kind) }
        return h + "</div>\n"
    }

    static func pickExamples(before: [ItemPrediction], after: [ItemPrediction]?, limit: Int)
        -> [(ItemPrediction, ItemPrediction?, String)]
    {
        guard let after else {
            let wrong = before.filter { !$0.correct }, right = before.filter(\.correct)
            let w = Array(wrong.prefix(max(limit * 2 / 3, limit - right.count)))
            return (w.map { ($0, nil, "wrong") } + right.prefix(limit - w.count).map { ($0, nil, "right") })
        }
        let byID = Dictionary(after.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        var fixed: [(ItemPrediction, ItemPrediction?, String)] = [], broken = fixed, changed = fixed, same = fixed
        for b in before {
            guard let a = byID[b.id] else { continue }
            if !b.correct && a.correct { fixed.append((b, a, "fixed")) } else if b.correct && !a.correct {
                broken.append((b, a, "broken"))
            } else if b.prediction != a.prediction { changed.append((b, a, "changed")) } else { same.append((b, a, "same")) }
        }
        let half = limit / 2
        var out = Array(fixed.prefix(half)) + Array(broken.prefix(half))
        for rest in [Array(fixed.dropFirst(half)), Array(broken.dropFirst(half)), changed] {
            out += rest.prefix(max(0, limit - out.count))
        }
        // Unchanged items only fill a short grid.
        return out + same.prefix(max(0, min(limit, 8) - out.count))
    }

    static func card(_ b: ItemPrediction, _ a: ItemPrediction?, kind: String) -> String {
        var h = "<div class=\"card \(kind)\">"
        if let t = b.thumbnail ?? a?.thumbnail {
            h += "<img src=\"data:image/png;base64,\(t)\" alt=\"\(esc(b.id))\" width=\"96\" height=\"96\">"
        } else {
            h += "<div class=\"noimg\">\(b.imagePath.map { esc(URL(fileURLWithPath: $0).lastPathComponent) } ?? "no image")</div>"
        }
        h += "<div><b>\(esc(b.id))</b> <span class=\"kind\">\(kind)</span>"
        let letters = optionLetters(count: b.options?.count ?? 0)
        if let options = b.options {
            h += "<ol>"
            for (l, text) in zip(letters, options) {
                var cls: [String] = []
                if b.prediction == l { cls.append("pb") }
                if a?.prediction == l { cls.append("pa") }
                let star = b.answer == l ? " <span class=\"lab\">★</span>" : ""
                h += "<li class=\"\(cls.joined(separator: " "))\">\(l). \(esc(text))\(star)</li>"
            }
            h += "</ol>"
        }
        h += "<div class=\"ans\">" + answerLine(a == nil ? "greedy" : "before", b)
        if let a { h += answerLine("after", a) }
        h += "label: \(esc(b.label ?? b.answer ?? "–"))"
        if let votes = (a ?? b).votes {
            let shown = votes.map { "\(esc($0.answer ?? "invalid"))×\($0.count)" }.joined(separator: " ")
            h += "<br>votes\(a == nil ? "" : " after"): \(shown)"
        }
        return h + "</div></div></div>\n"
    }

    static func answerLine(_ name: String, _ p: ItemPrediction) -> String {
        let reply = p.response.count > 40 ? String(p.response.prefix(40)) + "…" : p.response
        let mark = p.correct ? "<span class=\"good\">✓</span>" : "<span class=\"bad\">✗</span>"
        return "\(name): <b>\(esc(p.prediction ?? "invalid"))</b> \(mark) <span class=\"muted\">“\(esc(reply))”</span><br>"
    }

    // MARK: page

    static func page(title: String, body: String) -> String {
        """
        <!doctype html>
        <html><head><meta charset="utf-8"><title>\(esc(title))</title>
        <style>
        body{font:14px system-ui,sans-serif;margin:24px;max-width:1010px;color:#222}
        h1{font-size:20px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
        table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 9px;border-bottom:1px solid #e4e4e4;text-align:left}
        table.nums td,table.nums th{text-align:right}table.nums td{white-space:nowrap}table.nums td:first-child,table.nums th:first-child{text-align:left;white-space:normal}
        .charts{display:grid;grid-template-columns:repeat(2,480px);gap:12px 20px;align-items:start}
        .chart{display:block;background:#fff}.chart.wide{grid-column:span 2}
        .grid{display:grid;grid-template-columns:repeat(3,326px);gap:10px}
        table.runs{font-size:12px}table.runs td,table.runs th{padding:3px 6px;white-space:normal}
        .card{display:flex;gap:10px;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px}
        .card img{image-rendering:pixelated;flex:none;border:1px solid #ccc;width:84px;height:84px}
        .card ol{margin:4px 0;padding-left:0;list-style:none}.card li{padding:0 3px}
        .noimg{width:84px;height:84px;flex:none;background:#eee;color:#777;font-size:10px;overflow:hidden}
        .pb{background:#dbe8f6}.pa{outline:2px solid #e8772e}.lab{color:#b8860b}
        .kind{font-size:11px;padding:0 4px;border-radius:3px;background:#eee}
        .fixed .kind{background:#d4f0d4}.broken .kind{background:#f6d4d4}
        .good{color:#1a7f1a}.bad{color:#c02020}.muted{color:#777}
        pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;overflow-wrap:anywhere}
        </style></head><body>
        \(body)
        </body></html>

        """
    }

    static func esc(_ s: String) -> String { Chart.escape(s) }

    static func writeAtomically(_ text: String, to url: URL) throws {
        do {
            try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try text.write(to: url, atomically: true, encoding: .utf8)
        } catch {
            throw DatasetError(message: "\(url.path): cannot write (\(error.localizedDescription))")
        }
    }
}

/// Per-class accuracy and confusion matrices from predictions that carry options and labels
/// (older eval files without them fall back to answer letters).
struct ClassTable {
    var classes: [String]
    var predicted: [String]
    var before: [[Int]]
    var after: [[Int]]?

    static let invalid = "(invalid)", other = "(other)"

    init(before: [ItemPrediction], after: [ItemPrediction]?) {
        let truth = Self.order(before.map(Self.truth))
        classes = truth
        let outcomes = [Self.invalid, Self.other]
        var seen = truth
        for p in before + (after ?? []) where !seen.contains(Self.predictedClass(p)) && !outcomes.contains(Self.predictedClass(p)) {
            seen.append(Self.predictedClass(p))
        }
        let predicted = seen + outcomes.filter { o in (before + (after ?? [])).contains { Self.predictedClass($0) == o } }
        self.predicted = predicted
        func count(_ preds: [ItemPrediction]) -> [[Int]] {
            var m = Array(repeating: Array(repeating: 0, count: predicted.count), count: truth.count)
            for p in preds {
                guard let r = truth.firstIndex(of: Self.truth(p)), let c = predicted.firstIndex(of: Self.predictedClass(p)) else {
                    continue
                }
                m[r][c] += 1
            }
            return m
        }
        self.before = count(before)
        self.after = after.map(count)
    }

    /// Fashion-MNIST's class order where it applies, else alphabetical.
    static func order(_ names: [String]) -> [String] {
        let unique = Array(Set(names))
        if unique.allSatisfy(Dataset.fashionClasses.contains) { return Dataset.fashionClasses.filter(unique.contains) }
        return unique.sorted()
    }

    static func truth(_ p: ItemPrediction) -> String { p.label ?? p.answer ?? "?" }

    static func predictedClass(_ p: ItemPrediction) -> String {
        guard let pred = p.prediction else { return invalid }
        guard let options = p.options else { return p.label == nil ? pred : other }
        if let i = optionLetters(count: options.count).firstIndex(of: pred) { return options[i] }
        return options.contains(pred) ? pred : other
    }

    func accuracy(_ m: [[Int]]) -> [Double] {
        m.enumerated().map { r, row in
            let total = row.reduce(0, +)
            guard total > 0 else { return .nan }
            return Double(predicted.firstIndex(of: classes[r]).map { row[$0] } ?? 0) / Double(total)
        }
    }

    func accuracyChart() -> String {
        var series = [Chart.Series(after == nil ? "greedy" : "before", accuracy(before).map { 100 * $0 }, color: Chart.before)]
        if let after { series.append(.init("after", accuracy(after).map { 100 * $0 }, color: Chart.after)) }
        return Chart.bars(title: "Accuracy per class", valueLabel: "greedy accuracy (%)", labels: classes, series: series,
                          ceiling: 100, format: { String(format: "%.0f", $0) })
    }

    func confusion(after useAfter: Bool) -> String {
        let m = useAfter ? (after ?? before) : before
        let title = after == nil ? "Confusion matrix" : useAfter ? "Confusion after" : "Confusion before"
        return Chart.heatmap(title: title, rowLabel: "label", columnLabel: "greedy answer", rows: classes, columns: predicted,
                             counts: m)
    }

    func table() -> String {
        let b = accuracy(before), a = after.map(accuracy)
        let pct = { (x: Double) in x.isFinite ? String(format: "%.1f%%", 100 * x) : "–" }
        var h = "<table class=\"nums\"><tr><th>class</th><th>items</th><th>\(a == nil ? "accuracy" : "before")</th>"
        h += a == nil ? "" : "<th>after</th><th>change</th>"
        h += "<th>most common wrong answer</th></tr>\n"
        for (r, name) in classes.enumerated() {
            let m = (after ?? before)[r]
            h += "<tr><td>\(HTMLReport.esc(name))</td><td>\(m.reduce(0, +))</td><td>\(pct(b[r]))</td>"
            if let a {
                let change = a[r].isFinite && b[r].isFinite ? HTMLReport.signedPoints(a[r] - b[r]) : "–"
                h += "<td>\(pct(a[r]))</td><td>\(change)</td>"
            }
            let wrong = m.enumerated().filter { predicted[$0.offset] != name && $0.element > 0 }.max { $0.element < $1.element }
            h += "<td>" + (wrong.map { "\(HTMLReport.esc(predicted[$0.offset])) (\($0.element))" } ?? "–") + "</td></tr>\n"
        }
        return h + "</table>\n"
    }
}
