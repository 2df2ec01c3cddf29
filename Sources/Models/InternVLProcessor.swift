import Foundation
import Torch

/// InternVL's dynamic tiling: the image is resized to the grid of square tiles whose aspect ratio is
/// closest to its own (1...maxTiles tiles), cut into those tiles, and followed by a thumbnail of the
/// whole image when there is more than one tile. Matches transformers' GotOcr2 image processor (PIL
/// backend), which is what the `-hf` checkpoints use and what the original InternVL code does.
public struct InternVLImageProcessor: Sendable {
    public var tileSize: Int
    public var minTiles = 1
    public var maxTiles = 12
    public var useThumbnail = true
    public var mean: [Float] = [0.485, 0.456, 0.406]
    public var std: [Float] = [0.229, 0.224, 0.225]

    public init(tileSize: Int, minTiles: Int = 1, maxTiles: Int = 12, useThumbnail: Bool = true) {
        self.tileSize = tileSize
        self.minTiles = minTiles
        self.maxTiles = maxTiles
        self.useThumbnail = useThumbnail
    }

    /// Reads an HF `preprocessor_config.json` (GotOcr2ImageProcessor keys); `tileSize` is the fallback
    /// when the file does not give a size.
    public init(preprocessorConfig url: URL, tileSize: Int) throws {
        self.init(tileSize: tileSize)
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw ModelError("\(url.path): cannot read (\(error.localizedDescription))")
        }
        let json: Any
        do { json = try parseJSON(data) } catch let e as ModelError { throw ModelError("\(url.path): \(e.message)") }
        guard let obj = json as? [String: Any] else { throw ModelError("\(url.path): not a JSON object") }
        if let size = obj["size"] as? [String: Any] {
            guard let h = size["height"] as? Int, let w = size["width"] as? Int, h == w else {
                throw ModelError("\(url.path): size must be square {height, width}, got \(size)")
            }
            self.tileSize = h
        }
        minTiles = obj["min_patches"] as? Int ?? minTiles
        maxTiles = obj["max_patches"] as? Int ?? maxTiles
        // Without cropping HF resizes the whole image to one tile, which is the 1-tile grid.
        if obj["crop_to_patches"] as? Bool == false { minTiles = 1; maxTiles = 1 }
        if let m = obj["image_mean"] as? [Double] { mean = m.map(Float.init) }
        if let s = obj["image_std"] as? [Double] { std = s.map(Float.init) }
        if let r = obj["resample"] as? Int, r != 3 {
            throw ModelError("\(url.path): resample \(r) is not supported (InternVL uses 3, bicubic)")
        }
        do {
            try InternVLConfig.checkTiling(tileSize: tileSize, minTiles: minTiles, maxTiles: maxTiles)
        } catch let e as ModelError {
            throw ModelError("\(url.path): \(e.message)")
        }
    }

    /// (columns, rows) of the tile grid for an image of the given size.
    public static func grid(width: Int, height: Int, tileSize: Int, minTiles: Int, maxTiles: Int) -> (columns: Int, rows: Int) {
        let lo = max(minTiles, 1), hi = max(maxTiles, lo)
        var candidates: [(Int, Int)] = []
        for c in 1...hi {
            for r in 1...hi where (lo...hi).contains(c * r) { candidates.append((c, r)) }
        }
        // Stable by tile count: on an exact ratio tie the later (larger) grid may replace the earlier one.
        candidates = candidates.enumerated().sorted { ($0.element.0 * $0.element.1, $0.offset) < ($1.element.0 * $1.element.1, $1.offset) }.map(\.element)
        let aspect = Double(width) / Double(height)
        let area = Double(width * height)
        var best = (1, 1), bestDiff = Double.infinity
        for (c, r) in candidates {
            let diff = abs(aspect - Double(c) / Double(r))
            if diff < bestDiff {
                bestDiff = diff
                best = (c, r)
            } else if diff == bestDiff, area > 0.5 * Double(tileSize * tileSize * c * r) {
                // A tie goes to more tiles only while the image has the pixels to fill them.
                best = (c, r)
            }
        }
        return best
    }

    /// The tiles, row-major, then the thumbnail (when there is more than one tile).
    public func tiles(_ image: Image) -> [Image] {
        let image = image.rgb()
        let (cols, rows) = Self.grid(width: image.width, height: image.height, tileSize: tileSize, minTiles: minTiles, maxTiles: maxTiles)
        let resized = image.resized(width: cols * tileSize, height: rows * tileSize, filter: .bicubic)
        var out: [Image] = []
        for i in 0..<(cols * rows) {
            out.append(resized.crop(x: (i % cols) * tileSize, y: (i / cols) * tileSize, size: tileSize))
        }
        if useThumbnail && out.count != 1 {
            out.append(image.resized(width: tileSize, height: tileSize, filter: .bicubic))
        }
        return out
    }

    /// Normalised pixel values [tiles, 3, tileSize, tileSize].
    public func pixelValues(_ image: Image) throws -> Tensor {
        let tiles = tiles(image)
        let values = tiles.flatMap { $0.floatCHW(mean: mean, std: std) }
        return try Tensor(values, shape: [tiles.count, 3, tileSize, tileSize])
    }
}

extension Image {
    /// A size×size window at (x, y), inside the image.
    func crop(x: Int, y: Int, size: Int) -> Image {
        var out = [UInt8](repeating: 0, count: size * size * channels)
        let rowBytes = size * channels
        for r in 0..<size {
            let src = ((y + r) * width + x) * channels
            out.replaceSubrange(r * rowBytes..<(r + 1) * rowBytes, with: pixels[src..<(src + rowBytes)])
        }
        return Image(width: size, height: size, channels: channels, pixels: out)
    }
}
