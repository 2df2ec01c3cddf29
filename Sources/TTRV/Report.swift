import Foundation

/// A self-contained HTML page (inline SVG, no scripts) for an adapt run.
public enum HTMLReport {
    public static func write(_ r: AdaptReport, before: EvalReport, after: EvalReport, to url: URL) throws {
        let pct = { (x: Double) in String(format: "%.1f%%", 100 * x) }
        let steps = r.log.map { Double($0.step + 1) }
        var html = """
        <!doctype html><html><head><meta charset="utf-8"><title>ttrv adapt — \(esc(r.dataset))</title>
        <style>body{font:14px system-ui,sans-serif;margin:2em;max-width:980px;color:#222}h1{font-size:20px}
        table{border-collapse:collapse}td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}
        .charts{display:flex;flex-wrap:wrap;gap:16px}.muted{color:#777}</style></head><body>
        <h1>Test-time RL: \(esc(r.model))</h1>
        <p>Adapted on <b>\(r.adaptItems)</b> unlabelled items of <code>\(esc(r.dataset))</code> for \(r.steps) steps
        (\(String(format: "%.0f", r.seconds)) s, mode <code>\(r.mode.rawValue)</code>); evaluated on \(r.evalItems) items of
        <code>\(esc(r.evalDataset))</code>.\(r.visionNorm ? " Vision batch-norm statistics matched to the source before the RL steps." : "")\(r.stoppedEarly.map { " <b>Stopped early</b>: \(esc($0))." } ?? "")</p>
        <div class="charts">
        \(bars([("before", before.accuracy), ("after", after.accuracy)], title: "Greedy accuracy"))
        \(lines(steps, [("reward mean", r.log.map(\.rewardMean), "#1f77b4"), ("majority ratio", r.log.map(\.majorityRatio), "#ff7f0e"),
                        ("invalid share", r.log.map(\.invalidShare), "#d62728")], title: "Votes per step"))
        \(lines(steps, [("label accuracy of majority (monitor only)", r.log.map { $0.labelAccuracy ?? .nan }, "#2ca02c")], title: "Majority vs labels"))
        \(lines(steps, [("KL to start", r.log.map(\.kl), "#9467bd")], title: "KL (low_var_kl)"))
        </div>
        <h2>Numbers</h2><table>
        <tr><th></th><th>before</th><th>after</th></tr>
        <tr><td>accuracy</td><td>\(pct(before.accuracy))</td><td>\(pct(after.accuracy))</td></tr>
        <tr><td>invalid replies</td><td>\(pct(before.invalidShare))</td><td>\(pct(after.invalidShare))</td></tr>
        <tr><td>eval speed</td><td>\(String(format: "%.1f", before.imagesPerSecond)) img/s</td><td>\(String(format: "%.1f", after.imagesPerSecond)) img/s</td></tr>
        </table>
        <h2>Steps</h2><table><tr><th>step</th><th>reward</th><th>majority</th><th>invalid</th><th>entropy</th><th>length</th><th>KL</th><th>grad norm</th><th>lr</th><th>seconds</th></tr>
        """
        for l in r.log {
            html += "<tr><td>\(l.step + 1)</td><td>\(f(l.rewardMean))</td><td>\(f(l.majorityRatio))</td><td>\(f(l.invalidShare))</td><td>\(f(l.answerEntropy))</td><td>\(f(l.responseLength))</td><td>\(String(format: "%.2e", l.kl))</td><td>\(f(l.gradNorm))</td><td>\(String(format: "%.1e", l.lr))</td><td>\(String(format: "%.1f", l.seconds))</td></tr>\n"
        }
        html += "</table><p class=muted>Labels are never used for training; label accuracy is shown for monitoring only.</p></body></html>\n"
        try html.write(to: url, atomically: true, encoding: .utf8)
    }

    static func f(_ x: Double) -> String { String(format: "%.3f", x) }
    static func esc(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
    }

    static let w = 460.0, h = 240.0, pad = 40.0

    static func bars(_ values: [(String, Double)], title: String) -> String {
        let bw = (w - 2 * pad) / Double(values.count)
        var s = "<svg width=\"\(Int(w))\" height=\"\(Int(h))\" role=img><text x=\"\(pad)\" y=\"18\" font-weight=bold>\(esc(title))</text>"
        s += axis(minY: 0, maxY: 1)
        for (i, (name, v)) in values.enumerated() {
            let x = pad + Double(i) * bw + bw * 0.2, bh = (h - 2 * pad) * max(0, min(1, v))
            s += "<rect x=\"\(x)\" y=\"\(h - pad - bh)\" width=\"\(bw * 0.6)\" height=\"\(bh)\" fill=\"\(i == 0 ? "#aaa" : "#2ca02c")\"/>"
            s += "<text x=\"\(x + bw * 0.3)\" y=\"\(h - pad - bh - 4)\" text-anchor=middle>\(String(format: "%.1f%%", 100 * v))</text>"
            s += "<text x=\"\(x + bw * 0.3)\" y=\"\(h - pad + 16)\" text-anchor=middle>\(esc(name))</text>"
        }
        return s + "</svg>"
    }

    static func lines(_ xs: [Double], _ series: [(String, [Double], String)], title: String) -> String {
        let finite = series.flatMap(\.1).filter(\.isFinite)
        let lo = min(0, finite.min() ?? 0), hi = max(finite.max() ?? 1, lo + 1e-9)
        let x0 = xs.first ?? 0, x1 = max(xs.last ?? 1, x0 + 1)
        func px(_ x: Double) -> Double { pad + (x - x0) / (x1 - x0) * (w - 2 * pad) }
        func py(_ y: Double) -> Double { h - pad - (y - lo) / (hi - lo) * (h - 2 * pad) }
        var s = "<svg width=\"\(Int(w))\" height=\"\(Int(h))\" role=img><text x=\"\(pad)\" y=\"18\" font-weight=bold>\(esc(title))</text>"
        s += axis(minY: lo, maxY: hi)
        for (k, (name, ys, color)) in series.enumerated() {
            let pts = zip(xs, ys).filter { $0.1.isFinite }.map { "\(px($0.0)),\(py($0.1))" }.joined(separator: " ")
            s += "<polyline points=\"\(pts)\" fill=none stroke=\"\(color)\" stroke-width=2/>"
            s += "<text x=\"\(pad + 8)\" y=\"\(pad + 4 + Double(k) * 14)\" fill=\"\(color)\" font-size=12>\(esc(name))</text>"
        }
        s += "<text x=\"\(w / 2)\" y=\"\(h - 6)\" text-anchor=middle font-size=12>step</text>"
        return s + "</svg>"
    }

    static func axis(minY: Double, maxY: Double) -> String {
        "<line x1=\"\(pad)\" y1=\"\(h - pad)\" x2=\"\(w - pad)\" y2=\"\(h - pad)\" stroke=#444/><line x1=\"\(pad)\" y1=\"\(pad)\" x2=\"\(pad)\" y2=\"\(h - pad)\" stroke=#444/>"
            + "<text x=\"\(pad - 4)\" y=\"\(h - pad)\" text-anchor=end font-size=11>\(String(format: "%.2g", minY))</text>"
            + "<text x=\"\(pad - 4)\" y=\"\(pad + 4)\" text-anchor=end font-size=11>\(String(format: "%.2g", maxY))</text>"
    }
}
