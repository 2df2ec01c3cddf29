import Foundation
import XCTest
@testable import Torch

final class Block: Module {
    let q_proj: Linear, norm: RMSNorm
    init(seed: UInt64) throws {
        q_proj = try Linear(4, 3, bias: false, generator: Generator(seed: seed))
        norm = try RMSNorm(4)
        super.init()
        register("q_proj", q_proj)
        register("input_layernorm", norm)
    }
}

final class Net: Module {
    let layers: [Block]
    init(layers n: Int) throws {
        layers = try (0..<n).map { try Block(seed: UInt64($0)) }
        super.init()
        let list = Module()
        for (i, b) in layers.enumerated() { list.register("\(i)", b) }
        register("layers", list)
    }
}

final class ModuleOptimTests: XCTestCase {
    func testParameterNamesFreezeAndCount() throws {
        let net = try Net(layers: 2)
        let names = net.namedParameters(prefix: "model").map(\.name)
        XCTAssertEqual(names, ["model.layers.0.q_proj.weight", "model.layers.0.input_layernorm.weight",
                               "model.layers.1.q_proj.weight", "model.layers.1.input_layernorm.weight"])
        XCTAssertEqual(net.parameterCount, 2 * (12 + 4))
        try net.unfreeze()
        try net.freeze(matching: ["layers.*.input_layernorm.*"])
        XCTAssertEqual(net.trainableParameters.map(\.name), ["layers.0.q_proj.weight", "layers.1.q_proj.weight"])
        XCTAssertTrue(globMatch("a.*.c", "a.b.x.c"))
        XCTAssertFalse(globMatch("a.*.c", "a.b.d"))
    }

    func testLoadReportsMissingUnexpectedAndMismatched() throws {
        let net = try Net(layers: 2)
        var state = net.stateDict()
        let newW = try Tensor.full([3, 4], 0.5)
        state["layers.0.q_proj.weight"] = newW
        state["layers.1.q_proj.weight"] = try Tensor.zeros([4, 4])
        state.removeValue(forKey: "layers.1.input_layernorm.weight")
        state["extra.bias"] = try Tensor.zeros([1])
        XCTAssertThrowsError(try net.load(state, strict: true)) { XCTAssertTrue("\($0)".contains("missing")) }
        let report = try net.load(state, strict: false)
        XCTAssertEqual(report.missing, ["layers.1.input_layernorm.weight"])
        XCTAssertEqual(report.unexpected, ["extra.bias"])
        XCTAssertEqual(report.mismatched.map(\.name), ["layers.1.q_proj.weight"])
        XCTAssertEqual(report.loaded, 2)
        XCTAssertEqual(try net.layers[0].q_proj.weight.floats(), [Float](repeating: 0.5, count: 12))
    }

    /// AdamW against the update rule written out by hand (PyTorch's AdamW):
    /// p ← p(1 − lr·wd); m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
    /// p ← p − lr · (m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + eps).
    func testAdamWMatchesHandComputedTwoSteps() throws {
        let p = try Tensor([1.0, -2.0], shape: [2]).requiresGrad(true)
        let coeffs = [[0.5, -1.0], [0.25, 3.0]] // loss_t = Σ c_t · p, so g_t = c_t
        let lr = 0.1, b1 = 0.9, b2 = 0.999, eps = 1e-8, wd = 0.01
        let opt = try AdamW([p], lr: lr, betas: (b1, b2), eps: eps, weightDecay: wd)
        var expected = [1.0, -2.0], m = [0.0, 0.0], v = [0.0, 0.0]
        for (t, c) in coeffs.enumerated() {
            try (p * Tensor(c, shape: [2])).sum().backward()
            try opt.step()
            try opt.zeroGrad()
            for i in 0..<2 {
                expected[i] *= 1 - lr * wd
                m[i] = b1 * m[i] + (1 - b1) * c[i]
                v[i] = b2 * v[i] + (1 - b2) * c[i] * c[i]
                let mh = m[i] / (1 - Foundation.pow(b1, Double(t + 1)))
                let vh = v[i] / (1 - Foundation.pow(b2, Double(t + 1)))
                expected[i] -= lr * mh / (vh.squareRoot() + eps)
            }
        }
        let got = try p.doubles()
        for i in 0..<2 { XCTAssertEqual(got[i], expected[i], accuracy: 1e-12) }
    }

    func testGradClipScalesAndReportsNonFinite() throws {
        let a = try Tensor([Float(0), 0]).requiresGrad(true)
        try (a * Tensor([Float(3), 4])).sum().backward()
        let norm = try clipGradNorm([a], maxNorm: 1)
        XCTAssertEqual(norm, 5, accuracy: 1e-6)
        let g = try a.grad!.floats()
        XCTAssertEqual(g[0], 0.6, accuracy: 1e-5)
        XCTAssertEqual(g[1], 0.8, accuracy: 1e-5)
        let b = try Tensor([Float(0)]).requiresGrad(true)
        try (b * Double.infinity).sum().backward()
        XCTAssertFalse(try clipGradNorm([b], maxNorm: 1).isFinite)
    }

    func testSchedules() {
        let s = LRSchedule.cosine(warmup: 2, total: 10)
        XCTAssertEqual(s.factor(at: 0), 0)
        XCTAssertEqual(s.factor(at: 1), 0.5)
        XCTAssertEqual(s.factor(at: 2), 1, accuracy: 1e-12)
        XCTAssertEqual(s.factor(at: 6), 0.5, accuracy: 1e-12) // halfway through the decay
        XCTAssertEqual(s.factor(at: 10), 0, accuracy: 1e-12)
        XCTAssertEqual(LRSchedule.constant.factor(at: 99), 1)
    }
}

/// Batch-norm recalibration against statistics and outputs computed by hand in Swift.
final class BatchNormCalibrationTests: XCTestCase {
    /// [N, C, H, W] values in row-major order and their per-channel mean and population variance.
    func channelStats(_ x: [Double], n: Int, c: Int, hw: Int) -> (mean: [Double], variance: [Double]) {
        var mean = [Double](repeating: 0, count: c), sq = [Double](repeating: 0, count: c)
        for i in 0..<n { for ch in 0..<c { for k in 0..<hw {
            let v = x[(i * c + ch) * hw + k]
            mean[ch] += v
            sq[ch] += v * v
        } } }
        let m = Double(n * hw)
        let mu = mean.map { $0 / m }
        return (mu, zip(sq, mu).map { $0 / m - $1 * $1 })
    }

    func assertClose(_ a: [Double], _ b: [Double], accuracy: Double, line: UInt = #line) {
        XCTAssertEqual(a.count, b.count, line: line)
        for (x, y) in zip(a, b) { XCTAssertEqual(x, y, accuracy: accuracy, line: line) }
    }

    func testMeasureThenMatchMapsTheBatchOntoTheSourceStatistics() throws {
        let (n, c, h, w) = (3, 2, 2, 3)
        let bn = try BatchNorm2d(c, eps: 1e-3)
        try bn.runningMean.copy_(Tensor([0.5, -1] as [Float], shape: [2]))
        try bn.runningVar.copy_(Tensor([2, 0.5] as [Float], shape: [2]))
        try bn.weight.copy_(Tensor([1.5, 0.7] as [Float], shape: [2]))
        try bn.bias.copy_(Tensor([0.1, -0.2] as [Float], shape: [2]))
        let gen = Generator(seed: 1)
        let count = n * c * h * w
        let source = try Tensor.rand([count], dtype: .float64, generator: gen).doubles().map { $0 * 4 - 1 }
        let noise = try Tensor.rand([count], dtype: .float64, generator: gen).doubles()
        // Target: a different affine version of each channel plus noise, as a corruption would give.
        let target = source.enumerated().map { i, v in ((i / (h * w)) % c == 0 ? 0.2 * v + 3 : -0.5 * v) + 0.1 * noise[i] }
        let src = try Tensor(source.map(Float.init), shape: [n, c, h, w])
        let tgt = try Tensor(target.map(Float.init), shape: [n, c, h, w])

        bn.calibration = .measureSource
        let plain = try bn(src).floats()
        bn.calibration = .off
        let expectedSource = channelStats(source, n: n, c: c, hw: h * w)
        assertClose(try bn.source!.mean.floats().map(Double.init), expectedSource.mean, accuracy: 1e-5)
        assertClose(try bn.source!.variance.floats().map(Double.init), expectedSource.variance, accuracy: 1e-5)
        XCTAssertEqual(plain, try bn(src).floats(), "measuring does not change the output")
        XCTAssertNil(bn.correction)

        bn.calibration = .matchSource
        let matched = try bn(tgt).floats()
        bn.calibration = .off
        XCTAssertEqual(matched, try bn(tgt).floats(), "the correction stays in effect after matching")

        // By hand: standardise each target channel, give it the source moments, then batch-norm
        // with the running statistics.
        let t = channelStats(target, n: n, c: c, hw: h * w)
        let eps = 1e-3, rm = [0.5, -1.0], rv = [2.0, 0.5], g = [1.5, 0.7], b = [0.1, -0.2]
        var expected: [Double] = [], corrected: [Double] = []
        for (i, v) in target.enumerated() {
            let ch = (i / (h * w)) % c
            let x = (v - t.mean[ch]) / (t.variance[ch] + eps).squareRoot() * (expectedSource.variance[ch] + eps).squareRoot() + expectedSource.mean[ch]
            corrected.append(x)
            expected.append((x - rm[ch]) / (rv[ch] + eps).squareRoot() * g[ch] + b[ch])
        }
        assertClose(matched.map(Double.init), expected, accuracy: 1e-4)
        let after = channelStats(corrected, n: n, c: c, hw: h * w)
        assertClose(after.mean, expectedSource.mean, accuracy: 1e-9)

        try bn.setCorrection(scale: nil, shift: nil)
        XCTAssertEqual(try bn(src).floats(), plain, "removing the correction restores the plain layer")
        XCTAssertThrowsError(try bn.setCorrection(scale: Tensor.ones([3]), shift: Tensor.zeros([3])))
        let fresh = try BatchNorm2d(c)
        fresh.calibration = .matchSource
        XCTAssertThrowsError(try fresh(tgt)) { XCTAssertTrue("\($0)".contains("no source statistics")) }
    }
}

final class LoRATests: XCTestCase {
    /// y = W x + b + (alpha/r)·B A x, written out by hand in Swift.
    func byHand(_ layer: Linear, _ x: [Float], rows: Int) throws -> [Float] {
        let lora = try XCTUnwrap(layer.lora)
        let w = try layer.weight.floats(), b = try layer.bias!.floats()
        let a = try lora.a.floats(), bb = try lora.b.floats()
        let (out, inp, r) = (layer.outFeatures, layer.inFeatures, lora.rank)
        var y: [Float] = []
        for n in 0..<rows {
            let xn = Array(x[(n * inp)..<((n + 1) * inp)])
            let ax = (0..<r).map { k in (0..<inp).reduce(Float(0)) { $0 + a[k * inp + $1] * xn[$1] } }
            for o in 0..<out {
                let base = (0..<inp).reduce(b[o]) { $0 + w[o * inp + $1] * xn[$1] }
                let low = (0..<r).reduce(Float(0)) { $0 + bb[o * r + $1] * ax[$1] }
                y.append(base + Float(lora.scale) * low)
            }
        }
        return y
    }

    func testMergedInferenceEqualsTheAdapterAndFollowsUpdates() throws {
        let gen = Generator(seed: 3)
        let layer = try Linear(6, 5, bias: true, generator: gen)
        let xs = try Tensor.randn([3, 6], generator: gen)
        let plain = try noGrad { try layer(xs) }.floats()
        let root = Module()
        root.register("q_proj", layer)
        root.register("other", try Linear(6, 5, generator: gen))
        XCTAssertEqual(try root.addLoRA(rank: 2, alpha: 4, targets: ["q_proj"], generator: gen), 1)
        let lora = try XCTUnwrap(layer.lora)
        XCTAssertEqual(root.namedParameters().map(\.name).sorted(),
                       ["other.bias", "other.weight", "q_proj.bias", "q_proj.lora_A.weight", "q_proj.lora_B.weight",
                        "q_proj.weight"])
        XCTAssertEqual(root.loraModules.count, 2)
        let x = try xs.floats()
        // B starts at zero: the adapted layer equals the base layer.
        XCTAssertEqual(try noGrad { try layer(xs) }.floats(), plain)
        for round in 0..<3 {
            // In-place updates, as the optimiser makes them, must reach the merged weight.
            try noGrad { try lora.b.copy_(Tensor.randn([5, 2], generator: gen)) }
            let expected = try byHand(layer, x, rows: 3)
            let merged = try noGrad { try layer(xs) }.floats()
            let unmerged = try withGrad { try layer(xs) }.floats()
            for (i, e) in expected.enumerated() {
                XCTAssertEqual(merged[i], e, accuracy: 1e-4, "round \(round)")
                XCTAssertEqual(unmerged[i], e, accuracy: 1e-4, "round \(round)")
            }
        }
        XCTAssertThrowsError(try root.addLoRA(rank: 0, alpha: 1, targets: ["other"], generator: gen))
    }

    /// Under bf16 a pass without autograd multiplies by a bf16 copy of the merged weight. The merged weight is
    /// rebuilt as a new tensor (version 0) after every update, and a copy keyed by the version alone stayed the
    /// first one built: every rollout and evaluation of a LoRA run used the starting adapters.
    func testBF16MergedAdapterFollowsUpdates() throws {
        defer { Precision.current = .fp32 }
        Precision.current = .bf16
        let gen = Generator(seed: 4)
        let layer = try Linear(16, 8, generator: gen)
        let root = Module()
        root.register("q_proj", layer)
        try root.addLoRA(rank: 2, alpha: 4, targets: ["q_proj"], generator: gen)
        let x = try Tensor.randn([3, 16], generator: gen)
        for round in 0..<3 {
            try noGrad { try layer.lora!.b.copy_(Tensor.randn([8, 2], generator: gen)) }
            let merged = try noGrad { try layer(x) }, unmerged = try withGrad { try layer(x) }
            XCTAssertLessThan(try (merged - unmerged).abs().max().item(), 0.05, "round \(round)")
        }
    }

    /// The fused product equals each linear's own output (LoRA merged in, biases kept), in fp32 and bf16,
    /// and follows in-place updates of a weight and of an adapter.
    func testFusedLinearsEqualTheLinearsAndFollowUpdates() throws {
        defer { Precision.current = .fp32 }
        let gen = Generator(seed: 5)
        let parts = try [Linear(8, 6, generator: gen), Linear(8, 3, generator: gen), Linear(8, 3, generator: gen)]
        let root = Module()
        for (i, p) in parts.enumerated() { root.register("p\(i)", p) }
        try root.addLoRA(rank: 2, alpha: 4, targets: ["p0", "p2"], generator: gen)
        let fused = FusedLinears(parts)
        let x = try Tensor.randn([2, 4, 8], generator: gen)
        for precision in [Precision.fp32, .bf16] {
            Precision.current = precision
            for round in 0..<3 {
                let together = try noGrad { try fused(x) }
                let apart = try noGrad { try parts.map { try $0(x) } }
                let tolerance = precision == .fp32 ? 1e-5 : 2e-2
                for (t, a) in zip(together, apart) {
                    XCTAssertEqual(t.shape, a.shape)
                    XCTAssertLessThan(try (t - a).abs().max().item(), tolerance, "\(precision) round \(round)")
                }
                let g = try withGrad { try fused(x) }
                XCTAssertEqual(g.map(\.shape), apart.map(\.shape), "under autograd each linear runs on its own")
                try noGrad {
                    try parts[1].weight.add_(Tensor.randn([3, 8], generator: gen))
                    try parts[2].lora!.b.copy_(Tensor.randn([3, 2], generator: gen))
                }
            }
        }
    }
}

final class PrecisionTests: XCTestCase {
    override func tearDown() { Precision.current = .fp32 }

    /// bf16 autocast of a Linear: the product of the bf16-rounded operands accumulated in fp32, fp32 out;
    /// the gradient reaches the fp32 weight; the cached bf16 copy follows in-place updates.
    func testBF16LinearMatchesRoundedOperandsAndTrainsTheFP32Weight() throws {
        let gen = Generator(seed: 7)
        let layer = try Linear(64, 32, generator: gen)
        let x = try Tensor.randn([5, 64], generator: gen)
        Precision.current = .bf16
        let y = try noGrad { try layer(x) }
        XCTAssertEqual(y.dtype, .float32)
        let rounded = try F.linear(x.to(.bfloat16).to(.float32), layer.weight.to(.bfloat16).to(.float32),
                                   layer.bias!.to(.bfloat16).to(.float32))
        let diff = try (y - rounded).abs().max().item()
        XCTAssertLessThan(diff, 2e-2, "bf16 product vs rounded operands in fp32")
        let exact = try F.linear(x, layer.weight, layer.bias)
        XCTAssertGreaterThan(try (y - exact).abs().max().item(), 0, "bf16 really rounds")
        try noGrad { try layer.weight.mul_(2) }
        let y2 = try noGrad { try layer(x) }
        XCTAssertLessThan(try (y2 - F.linear(x, layer.weight, layer.bias)).abs().max().item(), 0.1,
                          "the cached bf16 weight follows an in-place update")
        try layer.weight.requiresGrad(true)
        try withGrad { try layer(x).sum().backward() }
        let g = try XCTUnwrap(layer.weight.grad)
        XCTAssertEqual(g.dtype, .float32)
        // d(sum(xWᵀ))/dW = column sums of x, to bf16 accuracy.
        let expected = try x.sum(dim: 0).unsqueeze(0).expand([32, 64])
        XCTAssertLessThan(try (g - expected).abs().max().item(), 0.05 * (try expected.abs().max().item()))
        // The training forward reuses the cached cast (a graph node standing for the cast): same values and
        // the same gradient, bit for bit, as casting inside the graph.
        let w2 = try Tensor.empty(layer.weight.shape)
        try noGrad { try w2.copy_(layer.weight) }
        try w2.requiresGrad(true)
        let (out1, out2) = try withGrad {
            (try layer(x), try F.linear(x.to(.bfloat16), w2.to(.bfloat16), layer.bias!.to(.bfloat16)).to(.float32))
        }
        XCTAssertEqual(try out1.detach().floats(), try out2.detach().floats())
        try layer.weight.zeroGrad()
        try withGrad { try (out1 * out1).sum().backward(); try (out2 * out2).sum().backward() }
        XCTAssertEqual(try XCTUnwrap(layer.weight.grad).floats(), try XCTUnwrap(w2.grad).floats())
    }
}

extension PrecisionTests {
    /// Autocast's dataflow: under bf16 a linear returns its input's dtype (fp32 in → fp32 out, bf16 in → bf16
    /// out), so a block casts once and its products chain in bf16. A LoRA-wrapped linear under autograd keeps
    /// the adapter's products in fp32, returns the input's dtype, and its adapter gradients are fp32 and equal
    /// (to bf16 accuracy) to the fp32 layer's.
    func testBF16OutputsFollowTheInputDtypeAndLoRAGradientsStayFP32() throws {
        let gen = Generator(seed: 11)
        let layer = try Linear(32, 16, generator: gen)
        let root = Module()
        root.register("q_proj", layer)
        try root.addLoRA(rank: 4, alpha: 8, targets: ["q_proj"], generator: gen)
        try noGrad { try layer.lora!.b.copy_(Tensor.randn([16, 4], generator: gen)) }
        for p in [layer.lora!.a, layer.lora!.b] { try p.requiresGrad(true) }
        let x = try Tensor.randn([6, 32], generator: gen)
        func adapterGrads(_ input: Tensor) throws -> (Tensor, [Float]) {
            for p in [layer.lora!.a, layer.lora!.b] { try p.zeroGrad() }
            let y = try withGrad { try layer(input) }
            try withGrad { try y.to(.float32).sum().backward() }
            let ga = try XCTUnwrap(layer.lora!.a.grad), gb = try XCTUnwrap(layer.lora!.b.grad)
            XCTAssertEqual(ga.dtype, .float32)
            return (y, try ga.floats() + gb.floats())
        }
        let (exactY, exactGrads) = try adapterGrads(x)
        Precision.current = .bf16
        XCTAssertEqual(try noGrad { try layer(x) }.dtype, .float32)
        XCTAssertEqual(try noGrad { try layer(x.to(.bfloat16)) }.dtype, .bfloat16)
        let (y, grads) = try adapterGrads(x.to(.bfloat16))
        XCTAssertEqual(y.dtype, .bfloat16)
        let scale = try exactY.abs().max().item()
        XCTAssertLessThan(try (y.to(.float32) - exactY).abs().max().item(), 0.02 * scale)
        let gScale = exactGrads.map(abs).max()!
        for (g, e) in zip(grads, exactGrads) { XCTAssertEqual(g, e, accuracy: 0.02 * gScale) }
    }
}

final class OptimizerVersionTests: XCTestCase {
    /// Caches of derived weights (bf16 copies, merged LoRA, fused projections) are keyed by libtorch's
    /// version counter, so an optimiser step must advance the version of every tensor it changes.
    func testAdamWStepAdvancesTheVersionOfWhatItUpdates() throws {
        let p = try Tensor.randn([4, 3], generator: Generator(seed: 1))
        try p.requiresGrad(true)
        let opt = try AdamW([p], lr: 0.1)
        try withGrad { try (p * p).sum().backward() }
        let before = p.version
        try opt.step()
        XCTAssertNotEqual(p.version, before, "AdamW changed the weight in place without a new version")
    }

    /// Adaptation swaps the reference weights in for the KL pass by exchanging storages: each tensor must
    /// keep its identity and gradient and hold the other's values; the version counters travel with the values,
    /// so a derived copy (a bf16 cast) is rebuilt for the other values and recognised again when they return,
    /// while an in-place write in between still forces a rebuild; a second exchange restores both.
    func testSwapExchangesValuesAndTheirVersions() throws {
        let p = try Tensor.randn([4, 3], generator: Generator(seed: 1))
        try p.requiresGrad(true)
        try withGrad { try (p * p).sum().backward() }
        let r = try Tensor.randn([4, 3], generator: Generator(seed: 2))
        let (pv, rv) = (try p.detach().floats(), try r.floats())
        var cache = CastCache()
        let castLive = try noGrad { try cache.bf16(p) }
        let (cp, cr) = (p.contentVersion, r.contentVersion)
        try p.swap_(r)
        XCTAssertEqual(try p.detach().floats(), rv)
        XCTAssertEqual(try r.floats(), pv)
        XCTAssertTrue(p.requiresGrad)
        XCTAssertEqual(try p.grad?.floats(), pv.map { 2 * $0 })
        XCTAssertEqual(p.contentVersion, cr)
        XCTAssertEqual(r.contentVersion, cp)
        let castRef = try noGrad { try cache.bf16(p) }
        XCTAssertEqual(try castRef.to(.float32).floats(), try p.detach().to(.bfloat16).to(.float32).floats())
        XCTAssertNotEqual(try castRef.to(.float32).floats(), try castLive.to(.float32).floats())
        try p.swap_(r)
        XCTAssertEqual(try p.detach().floats(), pv)
        XCTAssertEqual(try r.floats(), rv)
        XCTAssertEqual(p.contentVersion, cp)
        XCTAssertTrue(try noGrad { try cache.bf16(p) } === castLive, "the live values' cast was not reused")
        try noGrad { try p.mul_(2) }
        XCTAssertNotEqual(p.contentVersion, cp)
        XCTAssertEqual(try noGrad { try cache.bf16(p) }.to(.float32).floats(),
                       try p.detach().to(.bfloat16).to(.float32).floats(), "a write in place left the cast stale")
        XCTAssertThrowsError(try p.swap_(Tensor.zeros([3, 4])))
    }
}
