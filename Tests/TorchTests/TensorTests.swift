import Foundation
import XCTest
@testable import Torch

final class TensorTests: XCTestCase {
    func testCreationRoundTripAndDtypes() throws {
        let a = try Tensor([Float(1), 2, 3, 4, 5, 6], shape: [2, 3])
        XCTAssertEqual(a.shape, [2, 3])
        XCTAssertEqual(a.strides, [3, 1])
        XCTAssertEqual(a.dtype, .float32)
        XCTAssertEqual(try a.floats(), [1, 2, 3, 4, 5, 6])
        XCTAssertEqual(try a.to(.int64).ints(), [1, 2, 3, 4, 5, 6])
        XCTAssertEqual(try a.to(.bfloat16).to(.float32).floats(), [1, 2, 3, 4, 5, 6])
        XCTAssertEqual(try a.to(.float16).dtype, .float16)
        XCTAssertEqual(try Tensor([true, false]).bools(), [true, false])
        XCTAssertEqual(try Tensor.arange(5).ints(), [0, 1, 2, 3, 4])
        XCTAssertEqual(try Tensor.full([2], 7, dtype: .int32).toArray(Int32.self), [7, 7])
        XCTAssertThrowsError(try Tensor([Float(1), 2, 3], shape: [2, 2]))
    }

    func testBroadcastArithmeticAndComparisons() throws {
        let a = try Tensor([Float(1), 2, 3, 4, 5, 6], shape: [2, 3])
        let b = try Tensor([Float(10), 20, 30], shape: [3])
        XCTAssertEqual(try (a + b).floats(), [11, 22, 33, 14, 25, 36])
        XCTAssertEqual(try (a * 2 - 1).floats(), [1, 3, 5, 7, 9, 11])
        XCTAssertEqual(try (1 - a).floats(), [0, -1, -2, -3, -4, -5])
        XCTAssertEqual(try (12 / a).floats(), [12, 6, 4, 3, 2.4, 2])
        XCTAssertEqual(try a.gt(3).bools(), [false, false, false, true, true, true])
        XCTAssertEqual(try Tensor.where(a.gt(3), a, a.neg()).floats(), [-1, -2, -3, 4, 5, 6])
        XCTAssertEqual(try a.clamp(min: 2, max: 5).floats(), [2, 2, 3, 4, 5, 5])
        XCTAssertEqual(try a.maskedFill(a.lt(3), -1).floats(), [-1, -1, 3, 4, 5, 6])
    }

    func testReductions() throws {
        let a = try Tensor([Float(1), 5, 3, 4, 2, 6], shape: [2, 3])
        XCTAssertEqual(try a.sum().item(), 21)
        XCTAssertEqual(try a.sum(dim: 0).floats(), [5, 7, 9])
        XCTAssertEqual(try a.mean(dim: 1, keepDim: true).shape, [2, 1])
        XCTAssertEqual(try a.max([1]).floats(), [5, 6])
        XCTAssertEqual(try a.argmax(dim: 1).ints(), [1, 2])
        let (v, i) = try a.max(dim: 0)
        XCTAssertEqual(try v.floats(), [4, 5, 6])
        XCTAssertEqual(try i.ints(), [1, 0, 1])
        // unbiased std of [1,5,3] = 2
        XCTAssertEqual(try a.slice(dim: 0, end: 1).std().item(), 2, accuracy: 1e-6)
        let lse = try a.logsumexp(dim: 1).floats()
        XCTAssertEqual(Double(lse[0]), Foundation.log(Foundation.exp(1.0) + Foundation.exp(5.0) + Foundation.exp(3.0)), accuracy: 1e-5)
        XCTAssertEqual(try a.cumsum(dim: 1).floats(), [1, 6, 9, 4, 6, 12])
        let (tv, ti) = try a.topk(2, dim: 1)
        XCTAssertEqual(try tv.floats(), [5, 3, 6, 4])
        XCTAssertEqual(try ti.ints(), [1, 2, 2, 0])
        let (sv, si) = try a.sort(dim: 1, descending: true)
        XCTAssertEqual(try sv.floats(), [5, 3, 1, 6, 4, 2])
        XCTAssertEqual(try si.ints(), [1, 2, 0, 2, 0, 1])
    }

    func testShapeOpsAndIndexing() throws {
        let a = try Tensor.arange(0, 24, dtype: .float32).reshape([2, 3, 4])
        XCTAssertEqual(try a.permute([2, 0, 1]).shape, [4, 2, 3])
        let t = try a.transpose(1, 2)
        XCTAssertFalse(t.isContiguous)
        XCTAssertTrue(try t.contiguous().isContiguous)
        XCTAssertEqual(try a.narrow(dim: 2, start: 1, length: 2).select(dim: 0, index: 1).floats(), [13, 14, 17, 18, 21, 22])
        XCTAssertEqual(try a.slice(dim: 2, start: 0, end: 4, step: 2).shape, [2, 3, 2])
        XCTAssertEqual(try a.slice(dim: 1, start: -1).shape, [2, 1, 4])
        XCTAssertEqual(try a.unsqueeze(0).squeeze(0).shape, [2, 3, 4])
        XCTAssertEqual(try a.select(dim: 1, index: 0).unsqueeze(1).expand([2, 5, 4]).shape, [2, 5, 4])
        let idx = try Tensor([Int64(2), 0])
        XCTAssertEqual(try a.select(dim: 0, index: 0).indexSelect(dim: 0, index: idx).floats(), [8, 9, 10, 11, 0, 1, 2, 3])
        let c = try Tensor.cat([a, a], dim: 1)
        XCTAssertEqual(c.shape, [2, 6, 4])
        XCTAssertEqual(try Tensor.stack([a, a], dim: 0).shape, [2, 2, 3, 4])
        let parts = try c.split([2, 4], dim: 1)
        XCTAssertEqual(parts.map(\.shape), [[2, 2, 4], [2, 4, 4]])
        XCTAssertEqual(try a.chunk(2, dim: 2).count, 2)
        let s = try Tensor.zeros([2, 3]).scatter(dim: 1, index: Tensor([Int64(2), 0], shape: [2, 1]), src: Tensor.ones([2, 1]))
        XCTAssertEqual(try s.floats(), [0, 0, 1, 1, 0, 0])
        XCTAssertEqual(try Tensor([Float(1), 2], shape: [2, 1]).repeatInterleave(2, dim: 0).floats(), [1, 1, 2, 2])
        XCTAssertEqual(try Tensor.ones([3, 3]).tril().sum().item(), 6)
        XCTAssertEqual(try F.pad(Tensor.ones([1, 2]), [1, 2]).floats(), [0, 1, 1, 0, 0])
    }

    func testSamplingIsSeeded() throws {
        let probs = try Tensor([Float(0.1), 0.2, 0.3, 0.4], shape: [1, 4])
        let a = try F.multinomial(probs, 20, replacement: true, generator: Generator(seed: 3)).ints()
        let b = try F.multinomial(probs, 20, replacement: true, generator: Generator(seed: 3)).ints()
        let c = try F.multinomial(probs, 20, replacement: true, generator: Generator(seed: 4)).ints()
        XCTAssertEqual(a, b)
        XCTAssertNotEqual(a, c)
        XCTAssertTrue(a.allSatisfy { (0..<4).contains($0) })
        XCTAssertEqual(try Tensor.randn([5], generator: Generator(seed: 1)).floats(),
                       try Tensor.randn([5], generator: Generator(seed: 1)).floats())
    }

    func testLibtorchErrorsBecomeSwiftErrors() throws {
        let a = try Tensor.ones([2, 3]), b = try Tensor.ones([4, 5])
        XCTAssertThrowsError(try a.matmul(b)) { error in
            let msg = "\(error)"
            XCTAssertTrue(msg.contains("cannot be multiplied"), msg)
            XCTAssertTrue(msg.contains("2x3") && msg.contains("4x5"), msg)
        }
        XCTAssertThrowsError(try a.reshape([7]))
        XCTAssertThrowsError(try a.select(dim: 0, index: 9))
        XCTAssertThrowsError(try Tensor.cat([a, b], dim: 0))
        // the process survives and keeps working
        XCTAssertEqual(try a.sum().item(), 6)
    }

    func testAutogradBasicsAndNoGrad() throws {
        let x = try Tensor([Float(1), 2, 3]).requiresGrad(true)
        XCTAssertTrue(x.requiresGrad)
        XCTAssertNil(x.grad)
        try (x * x).sum().backward()
        XCTAssertEqual(try x.grad!.floats(), [2, 4, 6])
        try (x * x).sum().backward()
        XCTAssertEqual(try x.grad!.floats(), [4, 8, 12], "gradients accumulate")
        try x.zeroGrad()
        XCTAssertNil(x.grad)
        let y = try noGrad { try x * 2 }
        XCTAssertFalse(y.requiresGrad)
        XCTAssertTrue(LibTorch.gradEnabled, "noGrad restores the previous mode")
        XCTAssertFalse(try x.detach().requiresGrad)
    }

    func testThreadsSetting() throws {
        let before = LibTorch.threads
        LibTorch.threads = 1
        XCTAssertEqual(LibTorch.threads, 1)
        LibTorch.threads = before
    }

    func testNoLeakOver100kTensors() throws {
        func rssKB() -> Int {
            let s = (try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8)) ?? "0 0"
            let pages = Int(s.split(separator: " ")[1]) ?? 0
            return pages * 4
        }
        let base = try Tensor.ones([8])
        func churn(_ n: Int) throws {
            for i in 0..<n {
                let t = try Tensor.full([8], Double(i))
                _ = try (t + base).sum()
            }
        }
        try churn(10_000) // warm allocator caches
        let before = rssKB()
        try churn(100_000)
        let grown = rssKB() - before
        XCTAssertLessThan(grown, 4_000, "RSS grew by \(grown) KB over 100k tensors")
    }
}

/// A single input row times an fp32 weight runs through the shim's own row-dot kernel (batch-1 decode); its
/// result must equal the dot products worked out in double precision, for every shape the kernel splits
/// differently (K below, at and above its 32- and 8-wide blocks, with and without bias, 1-D to 3-D inputs),
/// and under autograd the library's product must still carry gradients.
final class SingleRowLinearTests: XCTestCase {
    func reference(_ x: [Float], _ w: [Float], _ b: [Float]?, n: Int, k: Int) -> [Float] {
        (0..<n).map { r in
            Float((0..<k).reduce(0.0) { $0 + Double(x[$1]) * Double(w[r * k + $1]) } + Double(b?[r] ?? 0))
        }
    }

    func testSingleRowProductEqualsTheDotProducts() throws {
        for (n, k) in [(5, 3), (7, 8), (130, 37), (64, 576), (1000, 1536)] {
            for biased in [false, true] {
                for shape in [[k], [1, k], [1, 1, k]] {
                    let g = Generator(seed: UInt64(n * k))
                    let x = try Tensor.randn(shape, generator: g), w = try Tensor.randn([n, k], generator: g)
                    let b = biased ? try Tensor.randn([n], generator: g) : nil
                    let y = try noGrad { try F.linear(x, w, b) }
                    XCTAssertEqual(y.shape, Array(shape.dropLast()) + [n])
                    let want = reference(try x.floats(), try w.floats(), try b?.floats(), n: n, k: k)
                    for (got, exp) in zip(try y.floats(), want) {
                        XCTAssertEqual(got, exp, accuracy: 1e-4 * max(1, abs(exp)), "n \(n) k \(k) shape \(shape)")
                    }
                }
            }
        }
    }

    /// A bf16 row times a bf16 weight (bf16 decoding): the products of the bf16 values accumulated in fp32,
    /// returned in bf16, so within bf16's rounding of the exact dot product (2⁻⁸ relative) plus fp32's
    /// accumulation error.
    func testBF16SingleRowProductEqualsTheDotProducts() throws {
        for (n, k) in [(5, 3), (7, 8), (130, 37), (64, 576), (1000, 1536)] {
            for biased in [false, true] {
                let g = Generator(seed: UInt64(n + k))
                let x = try Tensor.randn([1, 1, k], generator: g).to(.bfloat16)
                let w = try Tensor.randn([n, k], generator: g).to(.bfloat16)
                let b = biased ? try Tensor.randn([n], generator: g).to(.bfloat16) : nil
                let y = try noGrad { try F.linear(x, w, b) }
                XCTAssertEqual(y.dtype, .bfloat16)
                XCTAssertEqual(y.shape, [1, 1, n])
                let want = reference(try x.to(.float32).floats(), try w.to(.float32).floats(),
                                     try b?.to(.float32).floats(), n: n, k: k)
                let dotScale = Float(k).squareRoot()  // the size of a dot product of k unit normals
                for (got, exp) in zip(try y.to(.float32).floats(), want) {
                    XCTAssertEqual(got, exp, accuracy: abs(exp) / 128 + 1e-4 * dotScale, "n \(n) k \(k)")
                }
            }
        }
    }

    func testGradientsStillFlowForASingleRow() throws {
        let g = Generator(seed: 3)
        let x = try Tensor.randn([1, 1, 40], generator: g), w = try Tensor.randn([9, 40], generator: g)
        try w.requiresGrad(true)
        try withGrad { try F.linear(x, w, nil).sum().backward() }
        let grad = try XCTUnwrap(w.grad).floats()
        let xs = try x.floats()
        for r in 0..<9 { for c in 0..<40 { XCTAssertEqual(grad[r * 40 + c], xs[c], accuracy: 1e-6) } }
    }
}

/// The shim's CPU allocator keeps freed blocks of 1 MiB and more and hands them out again for requests of
/// the same size (or up to an eighth smaller); small blocks are not kept. Reused memory must still be written
/// in full by the operator that takes it.
final class CachingAllocatorTests: XCTestCase {
    func testLargeBlocksAreReusedAndSmallOnesAreNot() throws {
        let n = 3_300_001  // 13.2 MB of floats, a size no other test allocates
        var big: Tensor? = try Tensor.full([n], 5)
        let address = big!.contentVersion.storage
        big = nil
        // (Earlier tests may have filled the cache to its limit, so the total need not grow by n * 4: older
        // blocks are evicted to make room.)
        XCTAssertGreaterThanOrEqual(LibTorch.cpuCachedBytes, n * 4, "the freed block is kept")
        // The same size again (the cache hands out its smallest adequate block, so a smaller request could get
        // another test's block of a size in between).
        let again = try Tensor.zeros([n])
        XCTAssertEqual(again.contentVersion.storage, address, "a request of the same size reuses the block")
        XCTAssertEqual(try again.sum().item(), 0, "the reused block is overwritten")

        var small: Tensor? = try Tensor.ones([1000])
        XCTAssertEqual(small?.count, 1000)
        let cachedSmall = LibTorch.cpuCachedBytes
        small = nil
        XCTAssertEqual(LibTorch.cpuCachedBytes, cachedSmall, "blocks under 1 MiB go straight back to malloc")
    }

    /// Of blocks of one size, the most recently freed comes back first (it is the one still in the CPU's caches;
    /// handing out the oldest also let another test's block of the same size win over a block just freed).
    func testTheMostRecentlyFreedBlockOfASizeComesBackFirst() throws {
        let n = 2_900_017
        var a: Tensor? = try Tensor.zeros([n]), b: Tensor? = try Tensor.zeros([n])
        let addressB = b!.contentVersion.storage
        XCTAssertNotEqual(a!.contentVersion.storage, addressB)
        a = nil
        b = nil
        XCTAssertEqual(try Tensor.zeros([n]).contentVersion.storage, addressB)
    }

    /// A block of 2 MiB or more starts on a 2 MiB boundary (its data 64 bytes in, after the header), which is
    /// what lets the kernel back it with huge pages.
    func testBlocksFromTwoMiBStartOnAHugePageBoundary() throws {
        let huge = 2 << 20
        let big = try Tensor.zeros([5_000_003])  // 20 MB of floats, a size no other test allocates
        XCTAssertEqual((big.contentVersion.storage - 64) % huge, 0)
    }

    func testMuchSmallerRequestsGetFreshBlocks() throws {
        var big: Tensor? = try Tensor.zeros([4 << 20])  // 16 MiB
        let address = big!.contentVersion.storage
        big = nil
        let half = try Tensor.zeros([2 << 20])  // 8 MiB: more than an eighth smaller, so not the 16 MiB block
        XCTAssertNotEqual(half.contentVersion.storage, address)
    }
}

/// fp32 matrix products on oneDNN (gemm.cpp): against the same products in float64 (libtorch's double path,
/// which stays with the BLAS), forward and backward, with the operand layouts autograd passes.
final class FP32GemmTests: XCTestCase {
    func maxError(_ got: Tensor, _ want: Tensor) throws -> Double {
        try (got.to(.float64) - want).abs().max().item() / max(1, try want.abs().max().item())
    }

    func testProductsMatchFloat64() throws {
        let g = Generator(seed: 7)
        let before = LibTorch.oneDNNProducts
        let x3 = try Tensor.randn([3, 11, 64], generator: g), x2 = try Tensor.randn([13, 64], generator: g)
        let w = try Tensor.randn([48, 64], generator: g), b = try Tensor.randn([48], generator: g)
        let a = try Tensor.randn([3, 17, 40], generator: g), c = try Tensor.randn([3, 23, 40], generator: g)
        let d = { (t: Tensor) in try t.to(.float64) }
        let cases: [(String, Tensor, Tensor)] = [
            ("linear, 3-D input, bias (addmm)", try F.linear(x3, w, b), try F.linear(d(x3), d(w), d(b))),
            ("linear, no bias (mm)", try F.linear(x2, w), try F.linear(d(x2), d(w))),
            ("transposed left operand", try x2.transpose(0, 1).matmul(x2), try d(x2).transpose(0, 1).matmul(d(x2))),
            ("batched, transposed right (bmm)", try a.bmm(c.transpose(1, 2)), try d(a).bmm(d(c).transpose(1, 2))),
        ]
        for (name, got, want) in cases {
            XCTAssertEqual(got.shape, want.shape, name)
            XCTAssertLessThan(try maxError(got, want), 1e-5, name)
        }
        if LibTorch.fp32GemmOnOneDNN {
            XCTAssertGreaterThanOrEqual(LibTorch.oneDNNProducts - before, cases.count, "every product went to oneDNN")
        }
    }

    /// libtorch's MKL must ask the shim, not itself, whether it may use the kernels the CPU's features allow
    /// (gemm.cpp): this test executable links the shim as `ttrv` does. With the shim's definition hidden or
    /// renamed, MKL binds its own function and this fails; the products above check that the kernels it then
    /// picks still compute fp32 products.
    func testMKLVendorCheckIsAnsweredByTheShim() {
        XCTAssertTrue(LibTorch.mklVendorCheckBound, "mkl_serv_intel_cpu_true resolves to libtorch's own")
    }

    func testGradientsMatchFloat64() throws {
        let g = Generator(seed: 8)
        // float64 originals: `to` makes fresh fp32 leaves of them, and the last run (float64) uses them as leaves.
        let x = try Tensor.randn([2, 9, 32], generator: g).to(.float64)
        let w = try Tensor.randn([24, 32], generator: g).to(.float64)
        let b = try Tensor.randn([24], generator: g).to(.float64), up = try Tensor.randn([2, 9, 24], generator: g)
        func grads(_ dtype: DType) throws -> [Tensor] {
            let leaves = try [x, w, b].map { try $0.to(dtype).requiresGrad(true) }
            let y = try F.linear(leaves[0], leaves[1], leaves[2])
            try (y * up.to(dtype)).sum().backward()
            return try leaves.map { try XCTUnwrap($0.grad) }
        }
        let got = try grads(.float32), want = try grads(.float64)
        for (i, name) in ["input", "weight", "bias"].enumerated() {
            XCTAssertLessThan(try maxError(got[i], want[i]), 1e-5, name)
        }
    }

    func testEmptyInnerDimensionGivesZeros() throws {
        let z = try Tensor.zeros([4, 0]).matmul(Tensor.zeros([0, 3]))
        XCTAssertEqual(z.shape, [4, 3])
        XCTAssertEqual(try z.floats(), Array(repeating: 0, count: 12))
    }
}
