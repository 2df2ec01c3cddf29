import XCTest
@testable import Torch

/// Analytic gradients (libtorch autograd through our wrappers) against central finite
/// differences in float64: d/dx_i of sum(f(x) * w) for fixed random weights w.
final class GradCheckTests: XCTestCase {
    let gen = Generator(seed: 7)

    func randn(_ shape: [Int]) throws -> Tensor { try Tensor.randn(shape, dtype: .float64, generator: gen) }

    /// Checks the gradient of `f` with respect to `x` (a float64 leaf).
    func check(_ name: String, _ x: Tensor, tol: Double = 1e-6, file: StaticString = #filePath, line: UInt = #line,
               _ f: (Tensor) throws -> Tensor) throws {
        let probe = try f(x)
        let w = try randn(probe.shape)
        let xs = try x.doubles()
        let shape = x.shape
        func objective(_ values: [Double]) throws -> Double {
            try noGrad { try (f(try Tensor(values, shape: shape)) * w).sum().item() }
        }
        let leaf = try Tensor(xs, shape: shape).requiresGrad(true)
        try (f(leaf) * w).sum().backward()
        let analytic = try XCTUnwrap(leaf.grad, "\(name): no gradient", file: file, line: line).doubles()
        let h = 1e-6
        var worst = 0.0
        for i in xs.indices {
            var plus = xs, minus = xs
            plus[i] += h
            minus[i] -= h
            let numeric = (try objective(plus) - objective(minus)) / (2 * h)
            let err = abs(numeric - analytic[i]) / max(1, abs(numeric))
            worst = max(worst, err)
        }
        XCTAssertLessThan(worst, tol, "\(name): worst relative gradient error \(worst)", file: file, line: line)
    }

    func testMatmulAndLinear() throws {
        let b = try randn([4, 3])
        try check("matmul", try randn([2, 4])) { try $0.matmul(b) }
        let w = try randn([5, 4]), bias = try randn([5])
        try check("linear input", try randn([3, 4])) { try F.linear($0, w, bias) }
        let x = try randn([3, 4])
        try check("linear weight", try randn([5, 4])) { try F.linear(x, $0, bias) }
        try check("bmm", try randn([2, 3, 4])) { try $0.bmm(try Tensor.ones([2, 4, 2], dtype: .float64)) }
    }

    func testSoftmaxFamily() throws {
        try check("softmax", try randn([3, 5])) { try $0.softmax(dim: -1) }
        try check("log_softmax", try randn([3, 5])) { try $0.logSoftmax(dim: 1) }
        try check("logsumexp", try randn([3, 5])) { try $0.logsumexp(dim: 0) }
    }

    func testNorms() throws {
        let w = try randn([6])
        try check("rms_norm", try randn([2, 3, 6])) { try F.rmsNorm($0, shape: [6], weight: w, eps: 1e-6) }
        let x = try randn([2, 3, 6])
        try check("rms_norm weight", try randn([6])) { try F.rmsNorm(x, shape: [6], weight: $0, eps: 1e-6) }
        let b = try randn([6])
        try check("layer_norm", try randn([2, 3, 6])) { try F.layerNorm($0, shape: [6], weight: w, bias: b, eps: 1e-5) }
    }

    func testActivations() throws {
        try check("silu", try randn([10])) { try $0.silu() }
        try check("gelu erf", try randn([10])) { try $0.gelu() }
        try check("gelu tanh", try randn([10])) { try $0.gelu(tanh: true) }
        try check("sigmoid", try randn([10])) { try $0.sigmoid() }
        try check("tanh", try randn([10])) { try $0.tanh() }
        // relu6 is piecewise linear: keep points away from the kinks at 0 and 6.
        try check("relu6", try Tensor([-1.3, 0.4, 2.2, 5.1, 7.5], shape: [5])) { try $0.relu6() }
        try check("exp/log", try randn([6]).abs() + 0.5) { try ($0.exp() + $0.log()) }
    }

    func testAttention() throws {
        let k = try randn([1, 2, 5, 4]), v = try randn([1, 2, 5, 4])
        try check("sdpa causal q", try randn([1, 2, 5, 4])) { try F.scaledDotProductAttention($0, k, v, causal: true) }
        let q = try randn([1, 2, 5, 4])
        try check("sdpa k", try randn([1, 2, 5, 4])) { try F.scaledDotProductAttention(q, $0, v, causal: true) }
        let mask = try Tensor([true, true, false, true, true, true, false, true, true, true,
                               true, false, true, true, true, true, true, true, false, true,
                               true, true, true, true, true], shape: [1, 1, 5, 5])
        try check("sdpa mask v", try randn([1, 2, 5, 4])) { try F.scaledDotProductAttention(q, k, $0, mask: mask) }
        // GQA: 4 query heads share 2 key/value heads.
        let q4 = try randn([1, 4, 3, 4]), v2 = try randn([1, 2, 3, 4])
        try check("sdpa gqa", try randn([1, 2, 3, 4])) { try F.scaledDotProductAttention(q4, $0, v2, causal: true, enableGQA: true) }
    }

    func testEmbeddingGatherCrossEntropy() throws {
        let ids = try Tensor([Int64(2), 0, 2, 3], shape: [4])
        try check("embedding", try randn([5, 3])) { try F.embedding($0, ids) }
        let idx = try Tensor([Int64(1), 0, 3], shape: [3, 1])
        try check("gather", try randn([3, 4])) { try $0.gather(dim: 1, index: idx) }
        let target = try Tensor([Int64(1), -100, 3], shape: [3])
        try check("cross_entropy", try randn([3, 4])) { try F.crossEntropy($0, target, ignoreIndex: -100) }
    }

    func testConv2d() throws {
        let w = try randn([3, 2, 3, 3]), b = try randn([3])
        try check("conv2d input", try randn([1, 2, 5, 5])) { try F.conv2d($0, w, b, stride: (2, 2), padding: (1, 1)) }
        let x = try randn([1, 2, 5, 5])
        try check("conv2d weight", try randn([3, 2, 3, 3])) { try F.conv2d(x, $0, b, padding: (1, 1)) }
        let dw = try randn([2, 1, 3, 3])
        try check("depthwise conv2d", try randn([1, 2, 4, 4])) { try F.conv2d($0, dw, nil, padding: (1, 1), groups: 2) }
    }

    func testCheckerCatchesWrongGradient() throws {
        // The harness itself must be able to fail: a function whose backward disagrees with
        // its forward (detach hides part of the dependency) gives a large error.
        let x = try randn([4])
        let probe = try noGrad { try x * 1.0 }
        let w = try randn(probe.shape)
        let leaf = try Tensor(try x.doubles(), shape: [4]).requiresGrad(true)
        try ((leaf * leaf.detach()) * w).sum().backward()
        let analytic = try leaf.grad!.doubles()
        let xs = try x.doubles(), ws = try w.doubles()
        let numeric = xs.indices.map { 2 * xs[$0] * ws[$0] }
        let err = zip(analytic, numeric).map { abs($0 - $1) }.max()!
        XCTAssertGreaterThan(err, 1e-3)
    }
}
