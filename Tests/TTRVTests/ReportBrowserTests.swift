import Foundation
import XCTest
@testable import Models
@testable import TTRV

/// Renders report pages in headless Chromium and checks from the screenshot that every chart's
/// plot area has drawn pixels. Chart positions come from a copy of the page with a small script
/// that lists each `rect.plot`'s box; the pixels come from a screenshot of the page itself.
/// Skipped where no Chromium is installed (`make setup` installs Debian's `chromium`).
final class ReportBrowserTests: XCTestCase {
    struct Box: Equatable { var x, y, width, height: Int }

    static let width = 1100

    static func chromium() -> String? {
        if let path = ProcessInfo.processInfo.environment["CHROMIUM"] {
            return FileManager.default.isExecutableFile(atPath: path) ? path : nil
        }
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":")
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            for d in dirs where FileManager.default.isExecutableFile(atPath: "\(d)/\(name)") { return "\(d)/\(name)" }
        }
        return nil
    }

    func browser() throws -> String {
        guard let path = Self.chromium() else {
            throw XCTSkip("browser test skipped: no chromium on PATH or at $CHROMIUM (`make setup` installs Debian's chromium)")
        }
        return path
    }

    /// Runs Chromium headless (under coreutils `timeout`) and returns its stdout.
    func runBrowser(_ browser: String, _ args: [String], profile: URL) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/timeout")
        // Root in a container: no sandbox; small /dev/shm: no shared memory; one pixel per CSS pixel.
        p.arguments = ["120", browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                       "--hide-scrollbars", "--force-device-scale-factor=1", "--user-data-dir=\(profile.path)"] + args
        let out = Pipe()
        p.standardOutput = out
        p.standardError = FileHandle.nullDevice
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        XCTAssertEqual(p.terminationStatus, 0, "\(browser) \(args.joined(separator: " ")) failed")
        return String(decoding: data, as: UTF8.self)
    }

    /// The plot boxes and the page height, then a full-page screenshot.
    func render(_ page: URL) throws -> ([Box], Image) {
        let browser = try browser()
        let dir = page.deletingLastPathComponent()
        let html = try String(contentsOf: page, encoding: .utf8)
        let probe = dir.appendingPathComponent(page.deletingPathExtension().lastPathComponent + ".probe.html")
        let script = """
            <script>document.body.insertAdjacentHTML("beforeend", "<pre id='plot-boxes'>" + [...document.querySelectorAll("rect.plot")]
            .map(r => { const b = r.getBoundingClientRect(); return [b.left, b.top, b.width, b.height].map(Math.round).join(","); })
            .join(";") + "|" + document.documentElement.scrollHeight + "</pre>");</script>
            """
        try html.replacingOccurrences(of: "</body>", with: script + "</body>").write(to: probe, atomically: true, encoding: .utf8)
        let profile = dir.appendingPathComponent("chromium-profile")
        let dom = try runBrowser(browser, ["--window-size=\(Self.width),1000", "--dump-dom", probe.absoluteString], profile: profile)
        guard let start = dom.range(of: "<pre id=\"plot-boxes\">"), let end = dom.range(of: "</pre>", range: start.upperBound..<dom.endIndex) else {
            XCTFail("no plot boxes in the DOM dump of \(probe.path)")
            return ([], Image(width: 0, height: 0, channels: 1, pixels: []))
        }
        let parts = dom[start.upperBound..<end.lowerBound].split(separator: "|", omittingEmptySubsequences: false)
        let boxes = parts[0].split(separator: ";").map { b -> Box in
            let v = b.split(separator: ",").map { Int($0)! }
            return Box(x: v[0], y: v[1], width: v[2], height: v[3])
        }
        let height = min(16000, Int(parts[1])!)
        let shot = dir.appendingPathComponent(page.deletingPathExtension().lastPathComponent + ".png")
        _ = try runBrowser(browser, ["--window-size=\(Self.width),\(height)", "--screenshot=\(shot.path)", page.absoluteString], profile: profile)
        return (boxes, try Image.load(shot))
    }

    /// Pixels inside the box (2 px in from its edge) in a saturated colour: data are drawn in
    /// colour, while plot background, grid, axes and text are gray.
    static func drawnPixels(_ image: Image, _ b: Box) -> Int {
        let img = image.rgb()
        var n = 0
        for y in max(0, b.y + 2)..<min(img.height, b.y + b.height - 2) {
            for x in max(0, b.x + 2)..<min(img.width, b.x + b.width - 2) {
                let i = (y * img.width + x) * 3
                let c = img.pixels[i..<(i + 3)]
                if Int(c.max()!) - Int(c.min()!) >= 40 { n += 1 }
            }
        }
        return n
    }

    func assertEveryChartDrawn(_ page: URL, charts: Int, file: StaticString = #filePath, line: UInt = #line) throws {
        let (boxes, image) = try render(page)
        XCTAssertEqual(boxes.count, charts, "plot areas found in \(page.path)", file: file, line: line)
        for (i, b) in boxes.enumerated() {
            XCTAssertTrue(b.y + b.height <= image.height && b.x + b.width <= image.width, "chart \(i) outside the screenshot")
            XCTAssertGreaterThan(Self.drawnPixels(image, b), 30, "chart \(i) at \(b) of \(page.path) has nothing drawn",
                                 file: file, line: line)
        }
        print("screenshot: \(page.deletingPathExtension().path).png (\(image.width)×\(image.height), \(boxes.count) charts)")
    }

    func keepOrRemove(_ dir: URL) {
        if ProcessInfo.processInfo.environment["TTRV_KEEP_REPORTS"] == nil { try? FileManager.default.removeItem(at: dir) }
    }

    func testSingleRunReportDrawsEveryChart() throws {
        _ = try browser()
        let dir = try SyntheticRun.tempDir("browser-run")
        defer { keepOrRemove(dir) }
        try SyntheticRun.write(to: dir.appendingPathComponent("run"), votes: 8)
        let page = try Reports.build(inputs: [dir.appendingPathComponent("run").path], out: nil)[0]
        try assertEveryChartDrawn(page, charts: 13)
    }

    func testComparisonOfSixRunsDrawsEveryChart() throws {
        _ = try browser()
        let dir = try SyntheticRun.tempDir("browser-compare")
        defer { keepOrRemove(dir) }
        var inputs: [String] = []
        for (data, gains) in [("fashion-mnist-c:contrast:5", [0.1, 0.15, 0.2]), ("fashion-mnist-c:gaussian_noise:3", [-0.05, 0, 0.05])] {
            for (seed, g) in gains.enumerated() {
                let run = dir.appendingPathComponent("\(data.split(separator: ":")[1])-s\(seed)")
                try SyntheticRun.write(to: run, steps: 6 + seed, gain: g, seed: UInt64(seed), data: data)
                inputs.append(run.path)
            }
        }
        let page = try Reports.build(inputs: inputs, out: dir.appendingPathComponent("comparison.html").path)[0]
        try assertEveryChartDrawn(page, charts: 4)
    }

    /// The same check on real runs: `TTRV_REPORT_RUNS="runs/a runs/b" swift test --filter ReportBrowserTests`
    /// (one directory: its page; several: the comparison). Skipped when the variable is unset.
    func testGivenRunsReportDrawsEveryChart() throws {
        guard let runs = ProcessInfo.processInfo.environment["TTRV_REPORT_RUNS"] else {
            throw XCTSkip("set TTRV_REPORT_RUNS to check the reports of real run directories")
        }
        _ = try browser()
        let dir = try SyntheticRun.tempDir("browser-given")
        defer { keepOrRemove(dir) }
        let page = try Reports.build(inputs: runs.split(separator: " ").map(String.init), out: dir.appendingPathComponent("given.html").path)[0]
        let charts = try String(contentsOf: page, encoding: .utf8).components(separatedBy: "<rect class=\"plot\"").count - 1
        XCTAssertGreaterThan(charts, 0)
        try assertEveryChartDrawn(page, charts: charts)
    }

    /// The check can fail: an empty chart and a chart broken the way the old report was
    /// (an unquoted `stroke=#444/` swallows the shapes after it) both show no drawn pixels.
    func testCheckerSeesEmptyAndBrokenCharts() throws {
        _ = try browser()
        let dir = try SyntheticRun.tempDir("browser-control")
        defer { keepOrRemove(dir) }
        let good = Chart.lines(title: "good", xLabel: "step", yLabel: "y", x: [1, 2, 3], series: [.init("s", [1, 3, 2], color: "#1f77b4")])
        let empty = Chart.lines(title: "empty", xLabel: "step", yLabel: "y", x: [], series: [.init("s", [], color: "#1f77b4")])
        let broken = "<svg width=\"300\" height=\"200\"><rect class=\"plot\" x=\"10\" y=\"10\" width=\"280\" height=\"180\" fill=\"#fcfcfc\"/>"
            + "<line x1=\"10\" y1=\"190\" x2=\"290\" y2=\"190\" stroke=#444/><polyline points=\"10,190 290,10\" fill=none stroke=\"#1f77b4\" "
            + "stroke-width=8/></svg>"
        let page = dir.appendingPathComponent("control.html")
        try HTMLReport.page(title: "control", body: "<div class=\"charts\">\(good)\(empty)\(broken)</div>")
            .write(to: page, atomically: true, encoding: .utf8)
        let (boxes, image) = try render(page)
        XCTAssertEqual(boxes.count, 3)
        XCTAssertEqual(boxes.map { Self.drawnPixels(image, $0) > 30 }, [true, false, false])
    }
}
