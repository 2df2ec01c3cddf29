import Foundation
import XCTest

import Models

/// Fixtures come from scripts/reference/image_fixtures.py (Pillow); see that
/// script for how each expected .bin was produced.
private let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
    .deletingLastPathComponent().appendingPathComponent("Fixtures/images")

private struct Expected: Decodable {
    struct Shape: Decodable { let width: Int, height: Int, channels: Int }
    struct IDX: Decodable {
        let labels_count: Int, first_labels: [Int], label_sum: Int
        let images_count: Int, image_byte_sum: Int, first_image_weighted_sum: Int
    }
    let images: [String: Shape]
    let idx: IDX?
}

private let expected: Expected = {
    let data = try! Data(contentsOf: fixtures.appendingPathComponent("expected.json"))
    return try! JSONDecoder().decode(Expected.self, from: data)
}()

/// The image PIL produced for `name`, from its raw .bin dump.
private func reference(_ name: String) throws -> Image {
    let shape = try XCTUnwrap(expected.images[name], "no shape for \(name) in expected.json")
    let bytes = try Data(contentsOf: fixtures.appendingPathComponent(name + ".bin"))
    return Image(width: shape.width, height: shape.height, channels: shape.channels, pixels: [UInt8](bytes))
}

private func diff(_ a: Image, _ b: Image) -> (mean: Double, max: Int) {
    let d = zip(a.pixels, b.pixels).map { abs(Int($0) - Int($1)) }
    return (Double(d.reduce(0, +)) / Double(max(d.count, 1)), d.max() ?? 0)
}

private func assertSameShape(_ a: Image, _ b: Image, _ what: String, line: UInt = #line) {
    XCTAssertEqual([a.width, a.height, a.channels], [b.width, b.height, b.channels], what, line: line)
}

private func temporaryFile(_ name: String, _ bytes: [UInt8]) throws -> URL {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ttrv-image-tests-\(getpid())")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    let url = dir.appendingPathComponent(name)
    try Data(bytes).write(to: url)
    return url
}

/// Deterministic filler bytes for corrupt-file tests.
private func noiseBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var s = seed
    return (0..<count).map { _ in
        s = s &* 6364136223846793005 &+ 1442695040888963407
        return UInt8(truncatingIfNeeded: s >> 33)
    }
}

final class ImageDecodeTests: XCTestCase {
    func testPNGVariantsDecodeExactlyAsPIL() throws {
        // palette carries tRNS, rgba/gray_alpha have alpha: all must come out as
        // PIL's convert() gives them, i.e. alpha dropped, not composited.
        for name in ["rgb.png", "gray.png", "palette.png", "rgba.png", "gray_alpha.png", "bilevel.png", "gray16.png"] {
            let image = try Image.load(fixtures.appendingPathComponent(name))
            let want = try reference(name)
            assertSameShape(image, want, name)
            XCTAssertEqual(image.pixels, want.pixels, "\(name) differs from PIL")
        }
    }

    func testJPEGDecodeIsCloseToPIL() throws {
        // PIL bundles its own libjpeg-turbo build; the system one may round the
        // IDCT/upsampling differently, so allow up to 1 level on average.
        for name in ["photo.jpg", "gray.jpg", "cmyk.jpg"] {
            let image = try Image.load(fixtures.appendingPathComponent(name))
            let want = try reference(name)
            assertSameShape(image, want, name)
            let d = diff(image, want)
            XCTAssertLessThanOrEqual(d.mean, 1.0, "\(name): mean abs diff \(d.mean), max \(d.max)")
        }
    }

    func testFormatIsChosenByContentNotExtension() throws {
        let png = try Data(contentsOf: fixtures.appendingPathComponent("rgb.png"))
        let url = try temporaryFile("actually-a-png.jpg", [UInt8](png))
        XCTAssertEqual(try Image.load(url), try reference("rgb.png"))
    }

    func testMissingFileErrorNamesFile() {
        let url = fixtures.appendingPathComponent("does-not-exist.png")
        XCTAssertThrowsError(try Image.load(url)) { error in
            XCTAssertTrue("\(error)".contains(url.path), "\(error)")
            XCTAssertTrue("\(error)".contains("no such file"), "\(error)")
        }
    }

    func testCorruptFilesThrowInsteadOfCrashing() throws {
        let png = [UInt8](try Data(contentsOf: fixtures.appendingPathComponent("resize_src_100x80.png")))
        let jpeg = [UInt8](try Data(contentsOf: fixtures.appendingPathComponent("photo.jpg")))
        var badCRC = png
        badCRC[40] ^= 0xFF  // inside the IDAT chunk
        // SOF0 header claiming 60000 x 60000: must be refused before allocating ~10 GB.
        var huge = jpeg
        let sof = try XCTUnwrap((0..<huge.count - 1).first { huge[$0] == 0xFF && huge[$0 + 1] == 0xC0 })
        huge.replaceSubrange(sof + 5...sof + 8, with: [0xEA, 0x60, 0xEA, 0x60])
        let cases: [(String, [UInt8], String)] = [
            ("truncated.png", Array(png.prefix(png.count / 2)), "corrupt"),
            ("header-only.png", Array(png.prefix(8)), "corrupt"),
            ("bad-crc.png", badCRC, "corrupt"),
            ("random.jpg", noiseBytes(2000, seed: 7), "not a PNG or JPEG"),
            ("empty.png", [], "not a PNG or JPEG"),
            ("garbage-after-soi.jpg", [0xFF, 0xD8, 0xFF] + noiseBytes(2000, seed: 9), "corrupt"),
            ("truncated.jpg", Array(jpeg.prefix(jpeg.count * 2 / 3)), "corrupt"),
            ("huge.jpg", huge, "too large"),
        ]
        for (name, bytes, kind) in cases {
            let url = try temporaryFile(name, bytes)
            XCTAssertThrowsError(try Image.load(url), name) { error in
                XCTAssertTrue("\(error)".contains(url.path), "\(name): error does not name the file: \(error)")
                XCTAssertTrue("\(error)".contains(kind), "\(name): expected '\(kind)': \(error)")
            }
        }
    }
}

final class ImageTransformTests: XCTestCase {
    func testResizeMatchesPIL() throws {
        let sources = [
            "37x23": try Image.load(fixtures.appendingPathComponent("resize_src_37x23.png")),
            "100x80": try Image.load(fixtures.appendingPathComponent("resize_src_100x80.png")),
        ]
        let filters: [(String, ResizeFilter)] = [("bilinear", .bilinear), ("bicubic", .bicubic), ("nearest", .nearest)]
        // 50x17 and 90x40 take Pillow's vertical-first path, the others horizontal-first.
        for (src, size) in [("37x23", (64, 64)), ("100x80", (28, 21)), ("37x23", (50, 17)), ("100x80", (90, 40))] {
            for (fname, filter) in filters {
                let name = "resize_\(src)_\(size.0)x\(size.1)_\(fname)"
                let got = sources[src]!.resized(width: size.0, height: size.1, filter: filter)
                let want = try reference(name)
                assertSameShape(got, want, name)
                // The bar is 1/255 mean error on a [0, 1] scale; the
                // implementation is a port of Pillow's fixed-point code, so the
                // max error must stay tiny too.
                let d = diff(got, want)
                XCTAssertLessThanOrEqual(d.mean, 1.0, "\(name): mean abs diff \(d.mean)")
                XCTAssertLessThanOrEqual(d.max, 1, "\(name): max abs diff \(d.max)")
            }
        }
        let gray = Image(width: 100, height: 80, channels: 1,
                         pixels: stride(from: 0, to: 100 * 80 * 3, by: 3).map { sources["100x80"]!.pixels[$0] })
        let d = diff(gray.resized(width: 28, height: 21, filter: .bicubic), try reference("resize_100x80_gray_28x21_bicubic"))
        XCTAssertLessThanOrEqual(d.max, 1, "gray bicubic: mean \(d.mean) max \(d.max)")
    }

    func testRGBReplicatesGray() {
        let gray = Image(width: 2, height: 1, channels: 1, pixels: [7, 200])
        XCTAssertEqual(gray.rgb(), Image(width: 2, height: 1, channels: 3, pixels: [7, 7, 7, 200, 200, 200]))
        let rgb = Image(width: 1, height: 1, channels: 3, pixels: [1, 2, 3])
        XCTAssertEqual(rgb.rgb(), rgb)
    }

    func testCenterCropFollowsTorchvisionRounding() {
        // Pixel value = 10 * row + column, so the crop origin is readable from the output.
        let image = Image(width: 7, height: 6, channels: 1, pixels: (0..<6).flatMap { y in (0..<7).map { UInt8(10 * y + $0) } })
        // Left: round((7 - 2) / 2) = round(2.5) = 2 (half to even); top: round((6 - 3) / 2) = round(1.5) = 2.
        XCTAssertEqual(image.centerCropped(width: 2, height: 3).pixels, [22, 23, 32, 33, 42, 43])
        // Left: round(2 / 2) = 1; top: round(1 / 2) = round(0.5) = 0.
        XCTAssertEqual(image.centerCropped(width: 5, height: 5).pixels.prefix(5), [1, 2, 3, 4, 5])
        // Larger than the image: zero padding, (9 - 7) // 2 = 1 column on the left.
        let padded = image.centerCropped(width: 9, height: 6)
        XCTAssertEqual(Array(padded.pixels.prefix(9)), [0, 0, 1, 2, 3, 4, 5, 6, 0])
        XCTAssertEqual(padded.pixels[9 + 1], 10)
    }

    func testFloatCHWNormalisesPerChannel() {
        let image = Image(width: 2, height: 1, channels: 3, pixels: [0, 255, 51, 255, 0, 102])
        let out = image.floatCHW(mean: [0.5, 0.5, 0.2], std: [0.5, 0.25, 0.1])
        let want: [Float] = [-1, 1, 2, -2, 0.0, 2.0]  // R plane, G plane, B plane
        XCTAssertEqual(out.count, 6)
        for (a, b) in zip(out, want) { XCTAssertEqual(a, b, accuracy: 1e-5, "\(out)") }
        XCTAssertEqual(Image(width: 1, height: 1, channels: 1, pixels: [255]).floatCHW(mean: [0], std: [1], scale: 1), [255])
    }

    func testTiming() throws {
        let small = try Data(contentsOf: fixtures.appendingPathComponent("rgb.png"))
        let large = try Data(contentsOf: fixtures.appendingPathComponent("large.jpg"))
        func seconds(_ repeats: Int, _ body: () throws -> Void) rethrows -> Double {
            let start = Date()
            for _ in 0..<repeats { try body() }
            return Date().timeIntervalSince(start) / Double(repeats)
        }
        let tiny = try seconds(200) { _ = try Image.decode(small, name: "rgb.png").resized(width: 28, height: 28, filter: .bilinear) }
        var image = try Image.decode(large, name: "large.jpg")
        XCTAssertEqual([image.width, image.height, image.channels], [512, 512, 3])
        let big = try seconds(10) {
            image = try Image.decode(large, name: "large.jpg").resized(width: 224, height: 224, filter: .bicubic)
        }
        print(String(format: "decode+resize: small PNG %.1f µs, 512² JPEG → 224² bicubic %.2f ms", tiny * 1e6, big * 1e3))
        #if !DEBUG
            // Only meaningful with optimisation; debug builds are ~20x slower.
            XCTAssertLessThan(tiny, 200e-6)
            XCTAssertLessThan(big, 20e-3)
        #endif
    }
}

final class IDXTests: XCTestCase {
    private let fashion = URL(fileURLWithPath: "/usr/share/datasets/fashion-mnist")

    func testFashionMNISTTestSplit() throws {
        let labelsURL = fashion.appendingPathComponent("t10k-labels-idx1-ubyte.gz")
        let imagesURL = fashion.appendingPathComponent("t10k-images-idx3-ubyte.gz")
        guard FileManager.default.fileExists(atPath: labelsURL.path), let ref = expected.idx else {
            throw XCTSkip("Fashion-MNIST not installed at \(fashion.path)")
        }
        let labels = try IDXFile.read(labelsURL)
        XCTAssertEqual(labels.shape, [ref.labels_count])
        XCTAssertEqual(labels.bytes.prefix(ref.first_labels.count).map(Int.init), ref.first_labels)
        XCTAssertEqual(labels.bytes.reduce(0) { $0 + Int($1) }, ref.label_sum)

        let images = try IDXFile.read(imagesURL)
        XCTAssertEqual(images.shape, [ref.images_count, 28, 28])
        XCTAssertEqual(images.bytes.reduce(0) { $0 + Int($1) }, ref.image_byte_sum)
        let weighted = images.bytes.prefix(784).enumerated().reduce(0) { $0 + ($1.offset + 1) * Int($1.element) }
        XCTAssertEqual(weighted, ref.first_image_weighted_sum)
    }

    func testUncompressedIDX() throws {
        let url = try temporaryFile("tiny-idx3-ubyte", [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6])
        let (shape, bytes) = try IDXFile.read(url)
        XCTAssertEqual(shape, [2, 1, 3])
        XCTAssertEqual(bytes, [1, 2, 3, 4, 5, 6])
    }

    func testMalformedIDXThrowsNamingFile() throws {
        var cases: [(String, [UInt8], String)] = [
            ("short-data", [0, 0, 8, 1, 0, 0, 0, 5, 1, 2, 3], "truncated"),
            ("trailing-data", [0, 0, 8, 1, 0, 0, 0, 1, 1, 2], "trailing"),
            ("bad-magic", [1, 2, 8, 1, 0, 0, 0, 1, 1], "bad magic"),
            ("float-type", [0, 0, 0x0D, 1, 0, 0, 0, 1, 1, 2, 3, 4], "not unsigned byte"),
            ("short-header", [0, 0, 8, 3, 0, 0, 0, 1], "truncated header"),
            ("tiny", [0, 0], "shorter than"),
            ("bad-gzip", [0x1F, 0x8B] + noiseBytes(100, seed: 3), "gzip"),
        ]
        let real = fashion.appendingPathComponent("t10k-labels-idx1-ubyte.gz")
        if let gz = try? Data(contentsOf: real) {
            cases.append(("truncated.gz", Array(gz.prefix(gz.count / 2)), "gzip"))
        }
        for (name, bytes, detail) in cases {
            let url = try temporaryFile(name, bytes)
            XCTAssertThrowsError(try IDXFile.read(url), name) { error in
                XCTAssertTrue("\(error)".contains(url.path), "\(name): \(error)")
                XCTAssertTrue("\(error)".contains(detail), "\(name): expected '\(detail)' in \(error)")
            }
        }
        XCTAssertThrowsError(try IDXFile.read(fashion.appendingPathComponent("missing.gz"))) { error in
            XCTAssertTrue("\(error)".contains("missing.gz"), "\(error)")
        }
    }
}

final class ShiftTests: XCTestCase {
    /// A 28 px RGB image with edges and gradients, plus its gray version.
    private func samples() throws -> [Image] {
        let rgb = try Image.load(fixtures.appendingPathComponent("resize_src_100x80.png"))
            .resized(width: 28, height: 28, filter: .bilinear)
        let gray = Image(width: 28, height: 28, channels: 1, pixels: stride(from: 1, to: rgb.pixels.count, by: 3).map { rgb.pixels[$0] })
        return [rgb, gray]
    }

    private let noisy: Set<Shift> = [.gaussianNoise, .shotNoise]

    func testDeterministicPerSeed() throws {
        for image in try samples() {
            for shift in Shift.allCases {
                let a = applyShift(shift, severity: 3, to: image, seed: 42)
                XCTAssertEqual(a, applyShift(shift, severity: 3, to: image, seed: 42), "\(shift) not reproducible")
                assertSameShape(a, image, "\(shift)")
                let b = applyShift(shift, severity: 3, to: image, seed: 43)
                // Only the noise shifts are random; the rest must ignore the seed.
                if noisy.contains(shift) { XCTAssertNotEqual(a, b, "\(shift): seed has no effect") }
                else { XCTAssertEqual(a, b, "\(shift) depends on the seed") }
            }
        }
    }

    func testSeverityIsMonotone() throws {
        for image in try samples() {
            for shift in Shift.allCases {
                let deviations = (1...5).map { diff(applyShift(shift, severity: $0, to: image, seed: 7), image).mean }
                XCTAssertGreaterThan(deviations[0], 0.25, "\(shift) severity 1 leaves the image unchanged")
                for s in 1..<5 {
                    XCTAssertGreaterThan(deviations[s], deviations[s - 1], "\(shift) (\(image.channels) ch): \(deviations)")
                }
            }
        }
    }

    func testParameterTables() {
        // Mid-gray with σ = 0.12 (severity 2) clips almost nothing, so the measured
        // std must be the table's value.
        let flat = Image(width: 64, height: 64, channels: 1, pixels: [UInt8](repeating: 128, count: 4096))
        let noisy = applyShift(.gaussianNoise, severity: 2, to: flat, seed: 1).pixels.map { (Double($0) - 128) / 255 }
        let std = (noisy.map { $0 * $0 }.reduce(0, +) / Double(noisy.count)).squareRoot()
        XCTAssertEqual(std, 0.12, accuracy: 0.005)
        XCTAssertEqual(noisy.reduce(0, +) / Double(noisy.count), 0, accuracy: 0.01)

        // Shot noise is unbiased: Poisson(x·λ)/λ has mean x.
        let shot = applyShift(.shotNoise, severity: 2, to: flat, seed: 1).pixels.map(Double.init)
        XCTAssertEqual(shot.reduce(0, +) / Double(shot.count), 128, accuracy: 2)

        let image = Image(width: 3, height: 1, channels: 1, pixels: [0, 100, 255])
        XCTAssertEqual(applyShift(.invert, severity: 5, to: image, seed: 0).pixels, [255, 155, 0])
        // Contrast 0.05 around the mean 118.33: 118.33 + 0.05 * (x - 118.33).
        XCTAssertEqual(applyShift(.contrast, severity: 5, to: image, seed: 0).pixels, [112, 117, 125])
        // Brightness +0.4 (102 levels) on V, clipped at 1; black becomes gray V.
        XCTAssertEqual(applyShift(.brightness, severity: 4, to: image, seed: 0).pixels, [102, 202, 255])
        // In colour, hue and saturation are preserved: V 100 → 151 scales every channel by 1.51.
        let colour = Image(width: 1, height: 1, channels: 3, pixels: [100, 40, 0])
        XCTAssertEqual(applyShift(.brightness, severity: 2, to: colour, seed: 0).pixels, [151, 60, 0])
    }

    func testRotationTurnsCounterClockwiseWithBlackFill() {
        // Counter-clockwise as displayed (y down): 45° (severity 4) takes a dot
        // right of centre to up-right of centre.
        var pixels = [UInt8](repeating: 0, count: 21 * 21)
        pixels[10 * 21 + 18] = 255
        let image = Image(width: 21, height: 21, channels: 1, pixels: pixels)
        let out = applyShift(.rotate, severity: 4, to: image, seed: 0)
        let brightest = out.pixels.indices.max { out.pixels[$0] < out.pixels[$1] }!
        let (y, x) = (brightest / 21, brightest % 21)
        XCTAssertTrue(x > 10 && y < 10, "dot at (\(x), \(y))")
        // Corners come from outside the source: black.
        let white = Image(width: 21, height: 21, channels: 1, pixels: [UInt8](repeating: 255, count: 441))
        XCTAssertEqual(applyShift(.rotate, severity: 4, to: white, seed: 0).pixels[0], 0)
    }

    func testParse() throws {
        let (shift, severity) = try Shift.parse("gaussian_noise:3")
        XCTAssertEqual(shift, .gaussianNoise)
        XCTAssertEqual(severity, 3)
        XCTAssertEqual(try Shift.parse("rotate:5").0, .rotate)
        for bad in ["gaussian_noise", "gaussian_noise:0", "gaussian_noise:6", "fog:2", "contrast:x", "contrast:2:1", ""] {
            XCTAssertThrowsError(try Shift.parse(bad), bad) { XCTAssertTrue("\($0)".contains("'\(bad)'"), "\($0)") }
        }
    }
}
