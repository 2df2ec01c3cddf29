import Foundation

/// Inline SVG charts for the HTML reports. Every attribute value is quoted and every text
/// escaped, so each chart is well-formed XML: an HTML parser reads an unquoted `stroke=#444/>`
/// as the value `#444/`, leaves the element open and never draws the rest of the chart.
/// Each chart's plot area is a `<rect class="plot">` (the browser test looks for drawn pixels
/// inside it); data are drawn in saturated colours, frames and grid in grays.
public enum Chart {
    public struct Series {
        public var name: String
        public var values: [Double]
        public var color: String
        /// Drawn as a shaded band value ± spread (lines) or as error bars (bars).
        public var spread: [Double]?
        public var dashed = false

        public init(_ name: String, _ values: [Double], color: String, spread: [Double]? = nil, dashed: Bool = false) {
            self.name = name
            self.values = values
            self.color = color
            self.spread = spread
            self.dashed = dashed
        }
    }

    public static let palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
    public static let before = "#6b9bd1", after = "#e8772e"
    public static let width = 460.0
    static let plotBackground = "#fcfcfc", gridColor = "#e4e4e4", axisColor = "#555"

    /// A plot area inside a chart of the given size, with room for title, legend and axis labels.
    struct Frame {
        var width: Double, height: Double, left: Double, right: Double, top: Double, bottom: Double
        var plotWidth: Double { width - left - right }
        var plotHeight: Double { height - top - bottom }
    }

    // MARK: chart kinds

    /// Lines over x (step numbers), with markers when there are few points.
    public static func lines(title: String, xLabel: String, yLabel: String, x: [Double], series: [Series],
                             yFloor: Double? = nil, yCeiling: Double? = nil) -> String {
        let frame = Frame(width: width, height: 300, left: 64, right: 16, top: 58, bottom: 44)
        var all: [Double] = []
        for s in series {
            for (i, v) in s.values.enumerated() where v.isFinite {
                let d = s.spread.map { i < $0.count && $0[i].isFinite ? $0[i] : 0 } ?? 0
                all += [v - d, v + d]
            }
        }
        let (y0, y1) = range(all, floor: yFloor, ceiling: yCeiling)
        let yTicks = ticks(y0, y1)
        let xs = x.filter(\.isFinite)
        let (xa, xb) = (xs.min() ?? 0, max(xs.max() ?? 1, (xs.min() ?? 0) + 1)), (ya, yb) = (yTicks.first!, yTicks.last!)
        let xTicks = stepTicks(xa, xb)
        func px(_ v: Double) -> Double { frame.left + (v - xa) / (xb - xa) * frame.plotWidth }
        // 6 px inside the plot area, so that values at the floor stay off the axis line.
        func py(_ v: Double) -> Double { frame.top + frame.plotHeight - 6 - (v - ya) / (yb - ya) * (frame.plotHeight - 12) }
        var body = ""
        for s in series {
            let points = zip(x, s.values).filter { $0.0.isFinite && $0.1.isFinite }
            if let spread = s.spread {
                let band = zip(x, zip(s.values, spread)).filter { $0.0.isFinite && $0.1.0.isFinite && $0.1.1.isFinite }
                let upper = band.map { (px($0.0), py($0.1.0 + $0.1.1)) }, lower = band.map { (px($0.0), py($0.1.0 - $0.1.1)) }
                if band.count > 1 {
                    body += tag("polygon", ["points": pointList(upper + lower.reversed()), "fill": s.color, "fill-opacity": "0.18"])
                }
            }
            var attrs = ["points": pointList(points.map { (px($0.0), py($0.1)) }), "fill": "none", "stroke": s.color,
                         "stroke-width": "2"]
            if s.dashed { attrs["stroke-dasharray"] = "5 3" }
            body += tag("polyline", attrs)
            if points.count <= 40 {
                for p in points { body += tag("circle", ["cx": n(px(p.0)), "cy": n(py(p.1)), "r": "2.5", "fill": s.color]) }
            }
        }
        if all.isEmpty { body += noData(frame) }
        let yAxis = yTicks.map { (py($0), label($0, step: yTicks[1] - yTicks[0])) }
        let xAxis = xTicks.map { (px($0), label($0, step: 1)) }
        return svg(frame, title: title, legend: series.map { ($0.name, $0.color) }, xLabel: xLabel, yLabel: yLabel,
                   yAxis: yAxis, xAxis: xAxis, body: body)
    }

    /// Stacked vertical bars (e.g. the seconds of each step split by phase).
    public static func stacked(title: String, xLabel: String, yLabel: String, categories: [String], parts: [Series]) -> String {
        let frame = Frame(width: width, height: 300, left: 64, right: 16, top: 58, bottom: 44)
        let totals = categories.indices.map { i in parts.map { i < $0.values.count ? max(0, $0.values[i]) : 0 }.reduce(0, +) }
        let (_, y1) = range(totals, floor: 0, ceiling: nil)
        let yTicks = ticks(0, y1)
        let yb = yTicks.last!
        func py(_ v: Double) -> Double { frame.top + frame.plotHeight - v / yb * frame.plotHeight }
        let slot = frame.plotWidth / Double(max(1, categories.count))
        var body = ""
        for i in categories.indices {
            var base = 0.0
            for p in parts where i < p.values.count && p.values[i] > 0 {
                let x = frame.left + Double(i) * slot + slot * 0.15
                body += tag("rect", ["x": n(x), "y": n(py(base + p.values[i])), "width": n(slot * 0.7),
                                     "height": n(py(base) - py(base + p.values[i])), "fill": p.color], title: p.name)
                base += p.values[i]
            }
        }
        if totals.allSatisfy({ $0 <= 0 }) { body += noData(frame) }
        let every = max(1, Int((Double(categories.count) / 12).rounded(.up)))
        let xAxis = categories.enumerated().filter { $0.offset % every == 0 }
            .map { (frame.left + (Double($0.offset) + 0.5) * slot, $0.element) }
        return svg(frame, title: title, legend: parts.map { ($0.name, $0.color) }, xLabel: xLabel, yLabel: yLabel,
                   yAxis: yTicks.map { (py($0), label($0, step: yTicks[1] - yTicks[0])) }, xAxis: xAxis, body: body)
    }

    /// Horizontal grouped bars, one group per label (long labels fit on the left); `spread` draws error bars.
    public static func bars(title: String, valueLabel: String, labels: [String], series: [Series],
                            floor: Double? = 0, ceiling: Double? = nil, chartWidth: Double = width,
                            format: (Double) -> String) -> String {
        let longest = Double(labels.map(\.count).max() ?? 4)
        let labelWidth = min(chartWidth * (chartWidth > width ? 0.6 : 0.45), max(50, longest * 6.2 + 12))
        let fits = Int((labelWidth - 12) / 6.2)
        let row = max(16.0, 10.0 * Double(series.count) + 8)
        let frame = Frame(width: chartWidth, height: 58 + 44 + Double(labels.count) * row, left: labelWidth, right: 46, top: 58,
                          bottom: 44)
        var all: [Double] = []
        for s in series {
            for (i, v) in s.values.enumerated() where v.isFinite {
                let d = s.spread.map { i < $0.count && $0[i].isFinite ? $0[i] : 0 } ?? 0
                all += [v - d, v + d]
            }
        }
        let (x0, x1) = range(all, floor: floor, ceiling: ceiling, includeZero: true)
        let xTicks = ticks(x0, x1)
        let (xa, xb) = (xTicks.first!, xTicks.last!)
        func px(_ v: Double) -> Double { frame.left + (v - xa) / (xb - xa) * frame.plotWidth }
        let barHeight = (row - 6) / Double(max(1, series.count))
        var body = ""
        for (i, _) in labels.enumerated() {
            for (k, s) in series.enumerated() where i < s.values.count && s.values[i].isFinite {
                let v = s.values[i], y = frame.top + Double(i) * row + 3 + Double(k) * barHeight
                let (a, b) = (px(min(0, v).clamped(xa, xb)), px(max(0, v).clamped(xa, xb)))
                let zero = px(0)
                body += tag("rect", ["x": n(a), "y": n(y), "width": n(max(1, b - a)), "height": n(barHeight), "fill": s.color],
                            title: "\(s.name): \(format(v))")
                if let d = s.spread?[i], d.isFinite, d > 0 {
                    let mid = y + barHeight / 2
                    body += tag("line", ["x1": n(px(v - d)), "y1": n(mid), "x2": n(px(v + d)), "y2": n(mid), "stroke": "#222",
                                         "stroke-width": "1.2"])
                }
                let end = v >= 0 ? max(b, px(v + (s.spread?[i] ?? 0))) + 3 : min(a, zero) - 3
                body += tag("text", ["x": n(end), "y": n(y + barHeight - 1), "font-size": "10",
                                     "text-anchor": v >= 0 ? "start" : "end"], text: format(v))
            }
        }
        if xa < 0 { body += tag("line", ["x1": n(px(0)), "y1": n(frame.top), "x2": n(px(0)), "y2": n(frame.top + frame.plotHeight),
                                         "stroke": axisColor]) }
        if all.isEmpty { body += noData(frame) }
        // Long labels lose their middle and show in full as a tooltip.
        for (i, l) in labels.enumerated() where l.count > fits {
            let keep = fits - 1
            body += tag("text", ["x": n(frame.left - 6), "y": n(frame.top + (Double(i) + 0.5) * row + 4), "font-size": "11",
                                 "text-anchor": "end"], text: l.prefix(keep - keep / 2) + "…" + l.suffix(keep / 2), title: l)
        }
        let yAxis = labels.enumerated().map { i, l in (frame.top + (Double(i) + 0.5) * row, l.count > fits ? "" : l) }
        let xAxis = xTicks.map { (px($0), label($0, step: xTicks[1] - xTicks[0])) }
        return svg(frame, title: title, legend: series.count > 1 ? series.map { ($0.name, $0.color) } : [],
                   xLabel: valueLabel, yLabel: nil, yAxis: yAxis, xAxis: xAxis, body: body)
    }

    /// A confusion matrix: counts per (true row, predicted column), shaded by the row's share.
    public static func heatmap(title: String, rowLabel: String, columnLabel: String, rows: [String], columns: [String],
                               counts: [[Int]]) -> String {
        let labelWidth = min(130, Double(rows.map(\.count).max() ?? 4) * 6.4 + 12)
        let cell = min(36, (width - labelWidth - 30) / Double(max(1, columns.count)))
        let bottomRoom = min(110, Double(columns.map(\.count).max() ?? 4) * 5.2 + 36)
        let frame = Frame(width: width, height: 40 + Double(rows.count) * cell + bottomRoom, left: labelWidth + 22,
                          right: width - labelWidth - 22 - cell * Double(columns.count), top: 40, bottom: bottomRoom)
        var body = ""
        for (r, row) in counts.enumerated() {
            let total = max(1, row.reduce(0, +))
            for (c, count) in row.enumerated() where count > 0 {
                let share = Double(count) / Double(total)
                let x = frame.left + Double(c) * cell, y = frame.top + Double(r) * cell
                body += tag("rect", ["x": n(x), "y": n(y), "width": n(cell), "height": n(cell), "fill": heat(share)],
                            title: "\(rows[r]) → \(columns[c]): \(count) (\(Int((100 * share).rounded()))% of the row)")
                body += tag("text", ["x": n(x + cell / 2), "y": n(y + cell / 2 + 4), "font-size": cell < 22 ? "8" : "10",
                                     "text-anchor": "middle", "fill": share > 0.5 ? "#fff" : "#222"], text: "\(count)")
            }
        }
        if counts.allSatisfy({ $0.allSatisfy { $0 == 0 } }) { body += noData(frame) }
        var s = openSVG(frame, title: title)
        s += body
        for (r, name) in rows.enumerated() {
            s += tag("text", ["x": n(frame.left - 4), "y": n(frame.top + (Double(r) + 0.5) * cell + 4), "font-size": "10",
                              "text-anchor": "end"], text: name)
        }
        for (c, name) in columns.enumerated() {
            let x = frame.left + (Double(c) + 0.5) * cell + 3, y = frame.top + frame.plotHeight + 6
            s += tag("text", ["x": n(x), "y": n(y), "font-size": "10", "text-anchor": "end",
                              "transform": "rotate(-50 \(n(x)) \(n(y)))"], text: name)
        }
        s += tag("text", ["x": n(frame.left + frame.plotWidth / 2), "y": n(frame.height - 6), "font-size": "11",
                          "text-anchor": "middle"], text: columnLabel)
        s += tag("text", ["x": "12", "y": n(frame.top + frame.plotHeight / 2), "font-size": "11", "text-anchor": "middle",
                          "transform": "rotate(-90 12 \(n(frame.top + frame.plotHeight / 2)))"], text: rowLabel)
        return s + "</svg>"
    }

    // MARK: pieces

    static func heat(_ share: Double) -> String {
        // White to a saturated blue.
        let t = max(0, min(1, share))
        let r = Int(235 - 205 * t), g = Int(243 - 143 * t), b = Int(255 - 75 * t)
        return String(format: "#%02x%02x%02x", r, g, b)
    }

    static func openSVG(_ f: Frame, title: String) -> String {
        // A chart wider than one column spans both.
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\(f.width > width ? " wide" : "")\" "
            + "width=\"\(n(f.width))\" height=\"\(n(f.height))\" viewBox=\"0 0 \(n(f.width)) \(n(f.height))\" "
            + "role=\"img\" font-family=\"system-ui, sans-serif\">"
            + tag("title", [:], text: title)
            + tag("text", ["x": "4", "y": "16", "font-size": "14", "font-weight": "bold"], text: title)
            + tag("rect", ["class": "plot", "x": n(f.left), "y": n(f.top), "width": n(f.plotWidth), "height": n(f.plotHeight),
                           "fill": plotBackground])
    }

    /// The frame around a plot: title, legend, grid, axes with ticks and labels, then `body`.
    static func svg(_ f: Frame, title: String, legend: [(String, String)], xLabel: String, yLabel: String?,
                    yAxis: [(Double, String)], xAxis: [(Double, String)], body: String) -> String {
        var s = openSVG(f, title: title)
        let bottom = f.top + f.plotHeight
        let numericY = yLabel != nil
        for (y, _) in yAxis where numericY {
            s += tag("line", ["x1": n(f.left), "y1": n(y), "x2": n(f.left + f.plotWidth), "y2": n(y), "stroke": gridColor,
                              "shape-rendering": "crispEdges"])
        }
        s += body
        s += tag("line", ["x1": n(f.left), "y1": n(f.top), "x2": n(f.left), "y2": n(bottom), "stroke": axisColor])
        s += tag("line", ["x1": n(f.left), "y1": n(bottom), "x2": n(f.left + f.plotWidth), "y2": n(bottom), "stroke": axisColor])
        for (y, text) in yAxis {
            s += tag("line", ["x1": n(f.left - 4), "y1": n(y), "x2": n(f.left), "y2": n(y), "stroke": axisColor])
            if !text.isEmpty {
                s += tag("text", ["x": n(f.left - 6), "y": n(y + 4), "font-size": "11", "text-anchor": "end"], text: text)
            }
        }
        for (x, text) in xAxis {
            s += tag("line", ["x1": n(x), "y1": n(bottom), "x2": n(x), "y2": n(bottom + 4), "stroke": axisColor])
            s += tag("text", ["x": n(x), "y": n(bottom + 16), "font-size": "11", "text-anchor": "middle"], text: text)
        }
        s += tag("text", ["x": n(f.left + f.plotWidth / 2), "y": n(f.height - 8), "font-size": "12", "text-anchor": "middle"],
                 text: xLabel)
        if let yLabel {
            let cy = f.top + f.plotHeight / 2
            s += tag("text", ["x": "14", "y": n(cy), "font-size": "12", "text-anchor": "middle",
                              "transform": "rotate(-90 14 \(n(cy)))"], text: yLabel)
        }
        // Legend rows under the title, wrapped to the chart's width.
        var x = 8.0, y = 36.0
        for (name, color) in legend {
            let w = 18 + Double(name.count) * 6.4 + 14
            if x + w > f.width, x > 8 { x = 8; y += 15 }
            s += tag("rect", ["x": n(x), "y": n(y - 9), "width": "12", "height": "10", "fill": color])
            s += tag("text", ["x": n(x + 16), "y": n(y), "font-size": "11"], text: name)
            x += w
        }
        return s + "</svg>"
    }

    static func noData(_ f: Frame) -> String {
        tag("text", ["x": n(f.left + f.plotWidth / 2), "y": n(f.top + f.plotHeight / 2), "text-anchor": "middle",
                     "fill": "#999", "font-size": "12"], text: "no data")
    }

    /// An element with quoted, escaped attributes (sorted, so output is reproducible).
    static func tag(_ name: String, _ attrs: [String: String], text: String? = nil, title: String? = nil) -> String {
        let a = attrs.sorted { $0.key < $1.key }.map { " \($0.key)=\"\(escape($0.value))\"" }.joined()
        var inner = title.map { "<title>\(escape($0))</title>" } ?? ""
        if let text { inner += escape(text) }
        return inner.isEmpty ? "<\(name)\(a)/>" : "<\(name)\(a)>\(inner)</\(name)>"
    }

    public static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
            .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
    }

    static func n(_ x: Double) -> String { String(format: "%.1f", x.isFinite ? x : 0) }
    static func pointList(_ p: [(Double, Double)]) -> String { p.map { "\(n($0.0)),\(n($0.1))" }.joined(separator: " ") }

    // MARK: scales

    /// The data range widened by `floor`/`ceiling` (when given and the data stay inside them).
    static func range(_ values: [Double], floor: Double?, ceiling: Double?, includeZero: Bool = false) -> (Double, Double) {
        let finite = values.filter(\.isFinite)
        var lo = finite.min() ?? 0, hi = finite.max() ?? 1
        if let floor { lo = min(lo, floor) }
        if let ceiling { hi = max(hi, ceiling) }
        if includeZero { lo = min(lo, 0); hi = max(hi, 0) }
        if hi - lo < 1e-12 {
            let pad = hi == 0 ? 1 : abs(hi) * 0.1
            (lo, hi) = (lo - (lo == floor ? 0 : pad), hi + pad)
        }
        return (lo, hi)
    }

    /// "Nice" tick positions (steps of 1, 2 or 5 × 10^k) covering lo…hi, about five of them.
    static func ticks(_ lo: Double, _ hi: Double, integers: Bool = false) -> [Double] {
        let raw = (hi - lo) / 5
        let magnitude = pow(10, (log10(raw)).rounded(.down))
        var step = [1.0, 2, 5, 10].map { $0 * magnitude }.first { $0 >= raw } ?? 10 * magnitude
        if integers { step = max(1, step.rounded()) }
        let first = (lo / step).rounded(.down) * step
        var out = [first]
        while out.count < 2 || out.last! < hi - step * 1e-9 { out.append(first + Double(out.count) * step) }
        return out
    }

    /// Ticks for step numbers on exactly lo…hi: every step up to 12, else nice multiples plus the first step.
    static func stepTicks(_ lo: Double, _ hi: Double) -> [Double] {
        if hi - lo <= 11 { return Array(stride(from: lo, through: hi, by: 1)) }
        let inside = ticks(lo, hi, integers: true).filter { $0 >= lo && $0 <= hi }
        let step = inside.count > 1 ? inside[1] - inside[0] : hi - lo
        // Label the first step too, unless a tick sits close to it.
        return (inside.first ?? hi) - lo >= step / 2 ? [lo] + inside : inside
    }

    static func label(_ v: Double, step: Double) -> String {
        if abs(v) < step * 1e-6 { return "0" }
        return String(format: "%g", (v / step).rounded() * step)
    }
}

extension Double {
    func clamped(_ lo: Double, _ hi: Double) -> Double { Swift.min(Swift.max(self, lo), hi) }
}
