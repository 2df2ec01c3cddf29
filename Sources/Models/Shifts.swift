import Foundation

/// Distribution shifts in the style of ImageNet-C / CIFAR-10-C (Hendrycks &
/// Dietterich 2019), used to build test-time adaptation benchmarks.
///
/// Parameters by severity 1...5, on intensities scaled to [0, 1]:
///
/// | shift          | parameter                          | 1    | 2    | 3    | 4    | 5    |
/// |----------------|------------------------------------|------|------|------|------|------|
/// | gaussian_noise | noise std                          | 0.08 | 0.12 | 0.18 | 0.26 | 0.38 |
/// | shot_noise     | photons λ: Poisson(x·λ)/λ          | 60   | 25   | 12   | 5    | 3    |
/// | gaussian_blur  | σ px, min side < 64 (CIFAR-10-C)   | 0.4  | 0.6  | 0.7  | 0.8  | 1.0  |
/// | gaussian_blur  | σ px at 224, scaled by side/224    | 1    | 2    | 3    | 4    | 6    |
/// | contrast       | c: (x − mean)·c + mean, per channel| 0.4  | 0.3  | 0.2  | 0.1  | 0.05 |
/// | brightness     | added to HSV value                 | 0.1  | 0.2  | 0.3  | 0.4  | 0.5  |
/// | invert         | α: (1 − α)·x + α·(1 − x)           | 0.2  | 0.4  | 0.6  | 0.8  | 1.0  |
/// | rotate         | degrees counter-clockwise          | 10   | 20   | 30   | 45   | 60   |
///
/// Blur uses the CIFAR-10-C table for small images because ImageNet-C's σ scaled
/// down to 28 px (0.125...0.75) would barely change MNIST-sized digits. Rotation
/// is bilinear about the image centre with black fill. Results are rounded to
/// the nearest 8-bit value after clipping to [0, 1].
public enum Shift: String, CaseIterable, Sendable {
    case gaussianNoise = "gaussian_noise"
    case shotNoise = "shot_noise"
    case gaussianBlur = "gaussian_blur"
    case contrast, brightness, invert, rotate

    /// Parses "name:severity", e.g. "gaussian_noise:3".
    public static func parse(_ spec: String) throws -> (Shift, Int) {
        let parts = spec.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 2 else { throw ShiftError.invalidSpec(spec, "expected name:severity") }
        guard let shift = Shift(rawValue: String(parts[0])) else {
            throw ShiftError.invalidSpec(spec, "unknown shift '\(parts[0])'; known: "
                + allCases.map(\.rawValue).joined(separator: ", "))
        }
        guard let severity = Int(parts[1]), (1...5).contains(severity) else {
            throw ShiftError.invalidSpec(spec, "severity must be an integer 1...5")
        }
        return (shift, severity)
    }
}

public enum ShiftError: Error, CustomStringConvertible, Equatable {
    case invalidSpec(String, String)

    public var description: String {
        switch self {
        case let .invalidSpec(spec, reason): return "invalid shift '\(spec)': \(reason)"
        }
    }
}

/// Applies `shift` deterministically: the same seed gives the same pixels on any
/// machine (own PRNG, no system randomness). Only the noise shifts use the seed;
/// give each image its own (e.g. base seed mixed with the sample index), or
/// every image in a dataset receives the identical noise pattern.
public func applyShift(_ shift: Shift, severity: Int, to image: Image, seed: UInt64) -> Image {
    precondition((1...5).contains(severity), "severity must be 1...5")
    let s = severity - 1
    var x = image.pixels.map { Float($0) / 255 }
    var rng = NoiseRNG(seed: seed)
    switch shift {
    case .gaussianNoise:
        let sigma = Float([0.08, 0.12, 0.18, 0.26, 0.38][s])
        for i in x.indices { x[i] += sigma * rng.nextGaussian() }
    case .shotNoise:
        let lambda = Float([60, 25, 12, 5, 3][s])
        for i in x.indices { x[i] = Float(rng.nextPoisson(Double(x[i] * lambda))) / lambda }
    case .gaussianBlur:
        let side = Float(min(image.width, image.height))
        let sigma = side < 64 ? Float([0.4, 0.6, 0.7, 0.8, 1.0][s]) : Float([1, 2, 3, 4, 6][s]) * side / 224
        x = gaussianBlur(x, image, sigma: sigma)
    case .contrast:
        let c = Float([0.4, 0.3, 0.2, 0.1, 0.05][s])
        let ch = image.channels, n = max(image.width * image.height, 1)
        for k in 0..<ch {
            let mean = stride(from: k, to: x.count, by: ch).reduce(Float(0)) { $0 + x[$1] } / Float(n)
            for i in stride(from: k, to: x.count, by: ch) { x[i] = (x[i] - mean) * c + mean }
        }
    case .brightness:
        let delta = Float([0.1, 0.2, 0.3, 0.4, 0.5][s])
        // With hue and saturation fixed, every RGB channel is proportional to V =
        // max(r, g, b), so raising V is a per-pixel scale; no HSV round trip needed.
        let ch = image.channels
        for p in stride(from: 0, to: x.count, by: ch) {
            let v = x[p..<p + ch].max()!
            let newV = min(v + delta, 1)
            for k in p..<p + ch { x[k] = v > 0 ? x[k] * newV / v : newV }
        }
    case .invert:
        let alpha = Float([0.2, 0.4, 0.6, 0.8, 1.0][s])
        for i in x.indices { x[i] = (1 - alpha) * x[i] + alpha * (1 - x[i]) }
    case .rotate:
        x = rotated(x, image, degrees: Float([10, 20, 30, 45, 60][s]))
    }
    var out = image
    out.pixels = x.map { UInt8((min(max($0, 0), 1) * 255).rounded()) }
    return out
}

/// Separable Gaussian, kernel truncated at 4σ and edges clamped, as scipy's
/// gaussian_filter under skimage's default mode="nearest" (used by ImageNet-C).
private func gaussianBlur(_ x: [Float], _ image: Image, sigma: Float) -> [Float] {
    let radius = Int((4 * sigma).rounded(.up))
    var kernel = (-radius...radius).map { exp(-Float($0 * $0) / (2 * sigma * sigma)) }
    let total = kernel.reduce(0, +)
    kernel = kernel.map { $0 / total }
    let w = image.width, h = image.height, ch = image.channels
    func pass(_ src: [Float], horizontal: Bool) -> [Float] {
        var dst = [Float](repeating: 0, count: src.count)
        for y in 0..<h {
            for xx in 0..<w {
                for c in 0..<ch {
                    var acc: Float = 0
                    for t in -radius...radius {
                        let sx = horizontal ? min(max(xx + t, 0), w - 1) : xx
                        let sy = horizontal ? y : min(max(y + t, 0), h - 1)
                        acc += kernel[t + radius] * src[(sy * w + sx) * ch + c]
                    }
                    dst[(y * w + xx) * ch + c] = acc
                }
            }
        }
        return dst
    }
    return pass(pass(x, horizontal: true), horizontal: false)
}

/// Counter-clockwise rotation about the centre: each output pixel centre is
/// mapped back into the source and sampled bilinearly; samples outside the
/// source count as black, which also antialiases the rotated border.
private func rotated(_ x: [Float], _ image: Image, degrees: Float) -> [Float] {
    let w = image.width, h = image.height, ch = image.channels
    let theta = degrees * .pi / 180
    let cosT = cos(theta), sinT = sin(theta)
    let cx = Float(w) / 2, cy = Float(h) / 2
    var out = [Float](repeating: 0, count: x.count)
    func sample(_ ix: Int, _ iy: Int, _ c: Int) -> Float {
        ix >= 0 && ix < w && iy >= 0 && iy < h ? x[(iy * w + ix) * ch + c] : 0
    }
    for y in 0..<h {
        for xx in 0..<w {
            let px = Float(xx) + 0.5 - cx, py = Float(y) + 0.5 - cy
            // Inverse of a counter-clockwise turn in y-down image coordinates.
            let sx = cosT * px - sinT * py + cx - 0.5
            let sy = sinT * px + cosT * py + cy - 0.5
            let x0 = Int(sx.rounded(.down)), y0 = Int(sy.rounded(.down))
            let fx = sx - Float(x0), fy = sy - Float(y0)
            for c in 0..<ch {
                let top = sample(x0, y0, c) * (1 - fx) + sample(x0 + 1, y0, c) * fx
                let bottom = sample(x0, y0 + 1, c) * (1 - fx) + sample(x0 + 1, y0 + 1, c) * fx
                out[(y * w + xx) * ch + c] = top * (1 - fy) + bottom * fy
            }
        }
    }
    return out
}

/// SplitMix64 (Steele et al. 2014): tiny, fast, and seeds of 0 or 1 are fine.
/// Private so the exact stream, which fixes every shifted dataset, cannot drift
/// with changes made to PRNGs elsewhere.
private struct NoiseRNG {
    var state: UInt64
    var spare: Float?

    init(seed: UInt64) { state = seed }

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    mutating func nextUniform() -> Double { Double(next() >> 11) * 0x1p-53 }

    /// Box–Muller; the second variate of each pair is kept for the next call.
    mutating func nextGaussian() -> Float {
        if let z = spare { spare = nil; return z }
        let u1 = 1 - nextUniform()  // (0, 1], so log(u1) is finite
        let u2 = nextUniform()
        let r = (-2 * log(u1)).squareRoot()
        spare = Float(r * sin(2 * .pi * u2))
        return Float(r * cos(2 * .pi * u2))
    }

    /// Knuth's product method: O(λ) draws, fine for λ ≤ 60 (exp(-60) is a normal double).
    mutating func nextPoisson(_ lambda: Double) -> Int {
        let limit = exp(-lambda)
        var k = 0
        var p = nextUniform()
        while p > limit {
            k += 1
            p *= nextUniform()
        }
        return k
    }
}
