pub mod loss;
