import Foundation

/// `ttrv report`: one run directory → its page; one eval JSON → per-class and example view;
/// several run directories → a comparison page and CSV, seeds of one configuration grouped.
public enum Reports {
    /// Builds the page(s) and returns the files written.
    public static func build(inputs: [String], out: String?) throws -> [URL] {
        guard !inputs.isEmpty else { throw DatasetError(message: "report: give at least one run directory or eval JSON") }
        var runs: [RunFiles] = [], evals: [(String, EvalReport)] = []
        for input in inputs {
            let url = URL(fileURLWithPath: input)
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir) else {
                throw DatasetError(message: "\(input): no such file or directory")
            }
            if isDir.boolValue {
                runs.append(try RunFiles.load(url))
            } else if url.lastPathComponent == "report.json" {
                runs.append(try RunFiles.load(url.deletingLastPathComponent()))
            } else {
                let eval = try readJSON(EvalReport.self, url, what: "an eval report (`ttrv eval --json`)")
                evals.append((url.lastPathComponent, eval))
            }
        }
        if !evals.isEmpty && (evals.count > 1 || !runs.isEmpty) {
            let given = inputs.joined(separator: " ")
            throw DatasetError(message: "report: give one eval JSON on its own, or run directories (\(given))")
        }
        if let (name, eval) = evals.first {
            let url = URL(fileURLWithPath: out ?? (inputs[0] as NSString).deletingPathExtension + ".html")
            try HTMLReport.writeAtomically(HTMLReport.evalPage(eval, name: name), to: url)
            return [url]
        }
        let defaultOut = runs.count == 1
            ? runs[0].directory!.appendingPathComponent("report.html") : URL(fileURLWithPath: "comparison.html")
        let html = out.map { URL(fileURLWithPath: $0) } ?? defaultOut
        let csv = html.deletingPathExtension().appendingPathExtension("csv")
        let page = runs.count == 1 ? HTMLReport.runPage(runs[0]) : comparisonPage(runs, at: html.deletingLastPathComponent())
        try HTMLReport.writeAtomically(page, to: html)
        try HTMLReport.writeAtomically(csvText(runs), to: csv)
        return [html, csv]
    }

    // MARK: comparing runs

    /// A run's settings as (name, value): model and data, then every adapt option.
    static func settings(_ r: AdaptReport) -> [(String, String)] {
        [("model", r.model), ("data", r.dataset)] + (r.evalDataset == r.dataset ? [] : [("eval data", r.evalDataset)])
            + [("eval items", "\(r.evalItems)")] + HTMLReport.optionFields(r.options)
    }

    /// Names of the settings whose value is not the same in every run.
    static func differing(_ runs: [RunFiles]) -> [String] {
        let all: [[(String, String)]] = runs.map { settings($0.report) }
        var names: [String] = []
        for s in all { for (k, _) in s where !names.contains(k) { names.append(k) } }
        return names.filter { k in
            let values: [String] = all.map { s in s.first(where: { $0.0 == k })?.1 ?? "–" }
            return Set(values).count > 1
        }
    }

    struct Group {
        var label: String
        var runs: [RunFiles]
        /// Positions of the runs in the input order.
        var members: [Int]
    }

    /// Runs that differ only in their seed form one group, in order of first appearance.
    static func groups(_ runs: [RunFiles], differing: [String]) -> [Group] {
        var out: [Group] = []
        var keys: [String] = []
        for (index, run) in runs.enumerated() {
            let s = settings(run.report).filter { $0.0 != "seed" }
            let key = s.map { "\($0.0)=\($0.1)" }.joined(separator: "\u{1}")
            let shown = s.filter { differing.contains($0.0) }.map { $0.0 == "data" ? $0.1 : "\($0.0)=\($0.1)" }
            if let i = keys.firstIndex(of: key) {
                out[i].runs.append(run)
                out[i].members.append(index)
            } else {
                keys.append(key)
                out.append(Group(label: shown.isEmpty ? run.name : shown.joined(separator: " · "), runs: [run], members: [index]))
            }
        }
        return out
    }

    /// Drops the part up to the last ":" that every label shares ("fashion-mnist-c:contrast:5" → "contrast:5").
    static func withoutCommonPrefix(_ labels: [String]) -> [String] {
        guard labels.count > 1, var common = labels.first else { return labels }
        for l in labels.dropFirst() { common = String(zip(common, l).prefix { $0 == $1 }.map(\.0)) }
        guard let cut = common.lastIndex(of: ":") else { return labels }
        let n = common.distance(from: common.startIndex, to: cut) + 1
        return labels.map { String($0.dropFirst(n)) }
    }

    static func meanStd(_ xs: [Double]) -> (Double, Double) {
        let m = xs.reduce(0, +) / Double(max(1, xs.count))
        guard xs.count > 1 else { return (m, 0) }
        return (m, (xs.map { ($0 - m) * ($0 - m) }.reduce(0, +) / Double(xs.count - 1)).squareRoot())
    }

    static func gain(_ r: RunFiles) -> Double { r.after.accuracy - r.before.accuracy }

    /// `page` is the folder the page is written to, for links to each run's own report.
    static func comparisonPage(_ runs: [RunFiles], at page: URL? = nil) -> String {
        let diff = differing(runs), groups = groups(runs, differing: diff)
        let esc = HTMLReport.esc
        var h = "<h1>ttrv: \(runs.count) adaptation runs compared</h1>\n"
        h += "<p>Settings that differ between runs: "
        h += diff.isEmpty ? "none" : diff.map { "<code>\(esc($0))</code>" }.joined(separator: ", ")
        h += ". Runs that differ only in <code>seed</code> are grouped (mean ± sample std).</p>\n"
        let labels = withoutCommonPrefix(groups.map(\.label)).enumerated().map { i, l in
            groups[i].runs.count > 1 ? "\(l) ×\(groups[i].runs.count)" : l
        }
        let gains = groups.map { meanStd($0.runs.map(gain).map { 100 * $0 }) }
        let befores = groups.map { meanStd($0.runs.map { 100 * $0.before.accuracy }) }
        let afters = groups.map { meanStd($0.runs.map { 100 * $0.after.accuracy }) }
        let f1 = { (x: Double) in String(format: "%.1f", x) }
        // Long configuration labels get charts over the page's full width.
        let barWidth = (labels.map(\.count).max() ?? 0) > 30 ? 2 * Chart.width + 20 : Chart.width
        h += "<div class=\"charts\">\n"
        h += Chart.bars(title: "Accuracy gain", valueLabel: "after − before (points), mean ± std", labels: labels,
                        series: [.init("gain", gains.map(\.0), color: Chart.palette[2], spread: gains.map(\.1))],
                        floor: nil, chartWidth: barWidth, format: { String(format: "%+.1f", $0) })
        h += Chart.bars(title: "Accuracy before / after", valueLabel: "greedy accuracy (%), mean ± std", labels: labels,
                        series: [.init("before", befores.map(\.0), color: Chart.before, spread: befores.map(\.1)),
                                 .init("after", afters.map(\.0), color: Chart.after, spread: afters.map(\.1))],
                        ceiling: 100, chartWidth: barWidth, format: f1)
        if runs.count <= Chart.palette.count {
            let longest = runs.map { $0.steps.count }.max() ?? 0
            let x = (0..<longest).map { Double($0 + 1) }
            func curve(_ k: KeyPath<StepRecord, Double?>, _ title: String, _ y: String) -> String {
                Chart.lines(title: title, xLabel: "step", yLabel: y, x: x, series: runs.enumerated().map { i, r in
                    .init(r.name, r.steps.map { $0[keyPath: k] ?? .nan }, color: Chart.palette[i])
                })
            }
            h += curve(\.majorityRatio, "Majority ratio per run", "majority ratio")
            h += curve(\.kl, "KL to the starting model per run", "low-variance KL")
        }
        h += "</div>\n<h2>Groups</h2>\n<table class=\"nums\"><tr><th>configuration</th><th>runs</th><th>before</th><th>after</th>"
        h += "<th>gain (points)</th></tr>\n"
        for (i, g) in groups.enumerated() {
            let pm = { (m: (Double, Double)) in g.runs.count > 1 ? String(format: "%.1f ± %.1f", m.0, m.1) : f1(m.0) }
            h += "<tr><td>\(esc(g.label))</td><td>\(g.runs.count)</td><td>\(pm(befores[i]))</td><td>\(pm(afters[i]))</td>"
            let gain = g.runs.count > 1
                ? String(format: "%+.1f ± %.1f", gains[i].0, gains[i].1) : String(format: "%+.1f", gains[i].0)
            h += "<td>\(gain)</td></tr>\n"
        }
        h += "</table>\n<h2>Runs</h2>\n" + runTable(runs, differing: diff, page: page)
        return HTMLReport.page(title: "ttrv: \(runs.count) runs compared", body: h)
    }

    static func runTable(_ runs: [RunFiles], differing: [String], page: URL?) -> String {
        let esc = HTMLReport.esc
        var h = "<table class=\"nums runs\"><tr>" + columns.map { "<th>\(esc($0))</th>" }.joined() + "</tr>\n"
        for r in runs {
            let cells = row(r, differing: differing)
            let name = esc(cells[0])
            if let dir = r.directory {
                let href = Self.link(to: dir.appendingPathComponent("report.html"), from: page)
                h += "<tr><td><a href=\"\(esc(href))\">\(name)</a></td>"
            } else {
                h += "<tr><td>\(name)</td>"
            }
            h += cells.dropFirst().map { "<td>\(esc($0))</td>" }.joined() + "</tr>\n"
        }
        return h + "</table>\n"
    }

    /// A relative link when the target lies under the page's folder, else an absolute file URL.
    static func link(to target: URL, from page: URL?) -> String {
        let base = (page ?? URL(fileURLWithPath: ".")).standardizedFileURL.path + "/"
        let path = target.standardizedFileURL.path
        guard path.hasPrefix(base) else { return target.standardizedFileURL.absoluteString }
        return path.dropFirst(base.count).split(separator: "/")
            .map { $0.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed) ?? String($0) }.joined(separator: "/")
    }

    static let columns = ["run", "dataset", "mode", "differing options", "accuracy before", "accuracy after", "gain (points)",
                          "maj@N before", "maj@N after", "invalid before", "invalid after", "steps", "seconds", "stopped early"]

    static func row(_ run: RunFiles, differing: [String]) -> [String] {
        let r = run.report
        let opts = settings(r).filter { differing.contains($0.0) && $0.0 != "data" && $0.0 != "mode" }
        let pct = { (x: Double?) in x.map { String(format: "%.1f", 100 * $0) } ?? "" }
        let maj = { (e: EvalReport) in e.majAccuracy.map { String(format: "%.1f (N=%d)", 100 * $0, e.votes) } ?? "" }
        return [run.name, r.dataset, r.mode.rawValue, opts.map { "\($0.0)=\($0.1)" }.joined(separator: "; "),
                pct(run.before.accuracy), pct(run.after.accuracy), String(format: "%+.1f", 100 * gain(run)),
                maj(run.before), maj(run.after), pct(run.before.invalidShare), pct(run.after.invalidShare),
                "\(r.steps)", String(format: "%.0f", r.seconds), r.stoppedEarly ?? ""]
    }

    static func csvText(_ runs: [RunFiles]) -> String {
        let diff = differing(runs)
        let groups = groups(runs, differing: diff)
        let header = columns + ["group"]
        var lines = [header.map(csvField).joined(separator: ",")]
        for (i, r) in runs.enumerated() {
            let g = groups.firstIndex { $0.members.contains(i) }
            lines.append((row(r, differing: diff) + [g.map { groups[$0].label } ?? ""]).map(csvField).joined(separator: ","))
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// RFC 4180: quoted when it holds a comma, quote or line break; quotes doubled.
    static func csvField(_ s: String) -> String {
        s.contains(where: { ",\"\n\r".contains($0) }) ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
    }
}

extension HTMLReport {
    /// `ttrv report EVAL.json`: summary, per-class accuracy, confusion matrix and examples.
    public static func evalPage(_ e: EvalReport, name: String) -> String {
        var h = "<h1>ttrv eval: \(esc(e.model)) on \(esc(e.dataset))</h1>\n<p>From <code>\(esc(name))</code>: \(e.items) items"
        h += e.votes > 0 ? ", greedy and \(e.votes) samples per item.</p>\n" : ", greedy.</p>\n"
        h += summaryTable(before: e, after: nil)
        let classes = ClassTable(before: e.predictions, after: nil)
        h += "<div class=\"charts\">\n" + classes.accuracyChart() + classes.confusion(after: false) + "</div>\n" + classes.table()
        h += "<h2>Examples (wrong answers first)</h2>\n" + examples(before: e.predictions, after: nil)
        return page(title: "ttrv eval — \(e.dataset)", body: h)
    }
}
