"""`rentalml.streaming`: the Kafka stream processors (data-plane issue). Nothing is built here yet; the
package exists so the layout's subpackage mapping installs."""
